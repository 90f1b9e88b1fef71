"""The targets, the ratios, and the three outputs: results.json, results.md and results.png.

A *metric* is a number for one (size, world) point, named ``variant.quantity``: median seconds (``ls_sync.save``),
peak extra resident bytes (``ls_sync.mem_extra``), state or checkpoint bytes. A *check* divides two metrics and, when
it has a limit, says whether the target is met.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLIP = 4.0  # plot bars stop here so that one bad ratio does not flatten the others


@dataclass(frozen=True)
class Check:
    name: str
    num: str  # metric measured
    den: str | None  # baseline metric; None: the numerator already is a ratio
    limit: float | None = None  # None: information only
    kind: str = "ratio"  # "ratio": num/den <= limit; "below": num/den < limit; "overhead": num/den - 1 <= limit
    unit: str = "s"  # unit of num and den: "s" or "bytes"

    def value(self, metrics: dict[str, float]) -> float | None:
        if self.num not in metrics or (self.den is not None and not metrics.get(self.den)):
            return None
        ratio = metrics[self.num] / metrics[self.den] if self.den else metrics[self.num]
        return ratio - 1 if self.kind == "overhead" else ratio

    def met(self, value: float | None) -> bool | None:
        if value is None or self.limit is None:
            return None
        return value < self.limit if self.kind == "below" else value <= self.limit

    @property
    def target(self) -> str:
        if self.limit is None:
            return "info"
        if self.kind == "overhead":
            return f"<= {self.limit:.0%} overhead"
        return f"< {self.limit:g}x" if self.kind == "below" else f"<= {self.limit:g}x"


CHECKS = [
    Check("LS sync save / raw durable write", "ls_sync.save", "raw.write", 1.15),
    Check("LS sync save / raw durable write, early write-back", "ls_sync.save", "raw.write_early", 1.15),
    Check("LS sync save / Lightning save+fsync", "ls_sync.save", "lightning_save.durable", 1.0, "below"),
    Check("LS load / Lightning load", "ls_load.load", "lightning_load.load", 0.5),
    Check("LS load / raw read", "ls_load.load", "raw.read", 1.2),
    Check("LS async blocked / LS sync save", "ls_async.blocked", "ls_sync.save", 0.10),
    Check("LS async blocked / DCP async_save blocked", "ls_async.blocked", "dcp_async.blocked", 1.0),
    Check("LS async, background staging: blocked / LS sync save", "ls_async_bg.blocked", "ls_sync.save", 0.10),
    Check("LS async, background staging: blocked / DCP async_save blocked", "ls_async_bg.blocked",
          "dcp_async.blocked", 1.0),
    Check("SHARDED save / DCP save (FSDP2)", "sh_ls_save.save", "sh_dcp_save.save", 0.8),
    Check("SHARDED load / DCP load (FSDP2)", "sh_ls_load.load", "sh_dcp_load.load", 1.0),
    Check("SHARDED resharded load / DCP resharded load", "sh_ls_reshard.load", "sh_dcp_reshard.load", 1.0),
    Check("QUICK validation overhead", "ls_quick.save", "ls_quick.save_none", 0.05, "overhead"),
    Check("TENSOR validation overhead", "ls_tensor.save", "ls_tensor.save_none", 0.30, "overhead"),
    Check("LS sync save peak extra RSS / state", "ls_sync.mem_extra", "ls_sync.state_bytes", 0.10, unit="bytes"),
    Check("LS checkpoint bytes / state (REPLICATED once)", "ls_sync.ckpt_bytes", "ls_sync.state_bytes", 1.02,
          unit="bytes"),
    Check("LS load / raw read into new memory", "ls_load.load", "raw.read_fresh"),
    Check("LS async until committed / LS sync save", "ls_async.committed", "ls_sync.save"),
    Check("LS async, background staging: until an optimizer step may run / LS sync save", "ls_async_bg.staged",
          "ls_sync.save"),
    Check("loop rate during async save / no save", "ls_async.gil_ratio", None, unit=""),
    Check("LS sync save / DCP save", "ls_sync.save", "dcp_save.save"),
    Check("DCP async_save blocked / LS sync save", "dcp_async.blocked", "ls_sync.save"),
    Check("SHARDED save peak extra RSS / state per rank", "sh_ls_save.mem_extra", "sh_ls_save.state_per_rank",
          unit="bytes"),
    Check("LS load / DCP load", "ls_load.load", "dcp_load.load"),
    Check("Lightning save (not durable) / raw write", "lightning_save.save", "raw.write"),
    Check("Lightning save+fsync / raw write", "lightning_save.durable", "raw.write"),
    Check("Lightning load / raw read", "lightning_load.load", "raw.read"),
    Check("DCP save / raw write", "dcp_save.save", "raw.write"),
    Check("DCP load / raw read", "dcp_load.load", "raw.read"),
]


def metrics_of(variant: str, summary: dict[str, Any]) -> dict[str, float]:
    """Flatten one variant's aggregated result into ``variant.quantity`` numbers."""
    out = {f"{variant}.{name}": value for name, value in summary["median"].items()}
    out[f"{variant}.mem_extra"] = summary["mem_extra"]
    for key in ("state_bytes", "ckpt_bytes", "writer_ranks", "gil_ratio"):
        if key in summary["info"]:
            out[f"{variant}.{key}"] = summary["info"][key]
    if "state_bytes" in summary["info"] and variant.startswith("sh_"):
        out[f"{variant}.state_per_rank"] = summary["info"]["state_bytes"] / len(summary["memory_per_rank"])
    return out


def fmt_quantity(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:.3f} s" if unit == "s" else f"{value:.3f}"


def fmt_value(check: Check, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.1%}" if check.kind == "overhead" else f"{value:.3f}x"


def check_line(check: Check, metrics: dict[str, float]) -> str | None:
    """One stdout line for a check whose metrics are known, else None."""
    value = check.value(metrics)
    if value is None:
        return None
    met = check.met(value)
    verdict = "info" if met is None else ("met" if met else "MISSED")
    return f"    {check.name}: {fmt_value(check, value)} (target {check.target}: {verdict})"


# ---------------------------------------------------------------------------------------------- results.md
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    machine, config = report["machine"], report["config"]
    lines = [
        "# Checkpoint benchmark results", "",
        f"{machine['date']} on {machine['cpu_model']} ({machine['cpu_count']} CPUs, "
        f"{machine['mem_total_gib']:.0f} GiB RAM), torch {machine['torch']}, lightning {machine['lightning']}, "
        f"lightning_sharing {machine['lightning_sharing']} ({machine['git']}). Directory {config['dir']} "
        f"({machine['filesystem']}); {machine['page_cache']}. Sizes {config['sizes']} GB, world sizes "
        f"{config['worlds']}, median [min-max] of {config['repeats']} interleaved rounds; each round's time is "
        "its slowest rank's. Produced by `python benchmarks/bench_checkpoint.py`; see benchmarks/README.md for what "
        "each row means.", "",
    ]
    if len(config.get("merged_from", [])) > 1:
        runs = "; ".join(f"{r['date']} ({r['git']}" + (f", {r['wall_s'] / 60:.1f} min" if r.get("wall_s") else "")
                         + ")" for r in config["merged_from"])
        lines += [f"Points of {len(config['merged_from'])} runs of the same command merged with `--render` "
                  f"(runs: {runs}): a point marked *run DATE* comes from that run, every other from the first.", ""]
    if config.get("note"):
        lines += [f"**Conditions:** {config['note']}", ""]
    if config.get("skipped"):
        skipped = ", ".join(f"{size:g} GB at world size {world}" for size, world in config["skipped"])
        lines += [f"Skipped (would not have fit in the memory available when they started): {skipped}.", ""]
    if config.get("wall_s") and len(config.get("merged_from", [])) <= 1:
        lines += [f"The whole run took {config['wall_s'] / 60:.1f} minutes.", ""]
    for world in config["worlds"]:
        lines += [f"## World size {world}", "",
                  _row(["size (GB)", "check", "measured", "baseline", "ratio", "target", "met"]),
                  _row(["---"] * 7)]
        for point in (p for p in report["points"] if p["world"] == world):
            size = f"{point['size_gb']:g}" + (f" (*run {point['run']}*)" if "run" in point else "")
            for row in point["checks"]:
                met = {True: "met", False: "**missed**", None: row["missing"] or ""}[row["met"]]
                lines.append(_row([size, row["name"], row["measured"], row["baseline"],
                                   row["ratio"], row["target"], met]))
        lines += ["", f"### All variants, world size {world}", "",
                  _row(["size (GB)", "variant", "median seconds", "min-max (per round)", "peak extra RSS (max rank)",
                        "of state"]), _row(["---"] * 6)]
        for point in (p for p in report["points"] if p["world"] == world):
            lines += _variant_rows(point)
        lines.append("")
    return "\n".join(lines) + "\n"


def _variant_rows(point: dict[str, Any]) -> list[str]:
    rows = []
    state = point["state_bytes"] or 0
    for variant, summary in point["variants"].items():
        if "error" in summary:
            rows.append(_row([f"{point['size_gb']:g}", variant, summary["error"].splitlines()[0][:160], "", "", ""]))
            continue
        extra = summary["mem_extra"]
        share = f"{extra / state:.0%}" if state else "-"
        mem = fmt_quantity(extra, "bytes") + (" (masked)" if summary["mem_masked"] else "")
        for name, value in summary["median"].items():
            low, high = summary["spread"][name]
            runs = f"{low:.3f}-{high:.3f} (" + ", ".join(f"{v:.3f}" for v in summary["per_repeat"][name]) + ")"
            rows.append(_row([f"{point['size_gb']:g}", f"{variant}.{name}", f"{value:.3f}", runs, mem, share]))
    return rows


def _missing(check: Check, variants: dict[str, dict[str, Any]]) -> str:
    """Why a check has no value: the first variant it needs that is unavailable, failed or was not run."""
    for metric in (check.num, check.den):
        variant = metric.split(".")[0] if metric else None
        if variant is None:
            continue
        error = variants.get(variant, {}).get("error", "") if variant in variants else "not run"
        if error:
            why = "not run" if error == "not run" else ("not available" if error.startswith("not available")
                                                        else "skipped" if error.startswith("skipped") else "failed")
            return f"n/a ({variant} {why})"
    return "n/a"


def check_rows(metrics: dict[str, float], variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for check in CHECKS:
        value = check.value(metrics)
        rows.append({**asdict(check), "target": check.target, "value": value, "met": check.met(value),
                     "missing": _missing(check, variants) if value is None else None,
                     "measured": fmt_quantity(metrics.get(check.num), check.unit),
                     "baseline": (f"{check.den}: {fmt_quantity(metrics.get(check.den), check.unit)}"
                                  if check.den else "-"),
                     "ratio": fmt_value(check, value)})
    return rows


# ---------------------------------------------------------------------------------------------- results.png
def plot(report: dict[str, Any], path: Path) -> None:
    """Bars of measured / limit for every targeted check, one panel per world size: at or below 1 is met."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    targeted = [c for c in CHECKS if c.limit is not None]
    worlds, sizes = report["config"]["worlds"], report["config"]["sizes"]
    fig, axes = plt.subplots(len(worlds), 1, figsize=(12, 3.2 * len(worlds)), squeeze=False, sharex=True)
    width = 0.8 / max(len(sizes), 1)
    for ax, world in zip(axes[:, 0], worlds, strict=True):
        for i, size in enumerate(sizes):
            point = next((p for p in report["points"] if p["world"] == world and p["size_gb"] == size), None)
            heights = [_normalised(c, point) for c in targeted]
            xs = [k + (i - (len(sizes) - 1) / 2) * width for k in range(len(targeted))]
            shown = [min(max(h, 0.0), CLIP) if h is not None and math.isfinite(h) else 0.0 for h in heights]
            bars = ax.bar(xs, shown, width, label=f"{size:g} GB")
            # The real ratio on each bar: clipped bars and missing measurements stay readable.
            labels = ["n/a" if h is None else f"{h:.2g}" for h in heights]
            ax.bar_label(bars, labels=labels, fontsize=6, padding=1)
        ax.axhline(1.0, color="red", linewidth=1, linestyle="--")
        ax.set_ylabel(f"world {world}\nmeasured / target")
        ax.set_ylim(0.0, CLIP * 1.1)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xticks(range(len(targeted)), [c.name for c in targeted], rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"lightning_sharing vs targets: measured / target, at or below the dashed line is met "
                 f"(bars clipped at {CLIP:g}, labels unclipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _normalised(check: Check, point: dict[str, Any] | None) -> float | None:
    """Measured / allowed, so that 1 is the target for every check; an overhead compares total times (1 + o)."""
    if point is None:
        return None
    value = check.value(point["metrics"])
    if value is None or not check.limit:
        return None
    return (1 + value) / (1 + check.limit) if check.kind == "overhead" else value / check.limit


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "results.png", out / "sweep.png", out / "headline.png"]
    paths[0].write_text(json.dumps(report, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    from _bench_sweep import plot_sweep

    plot_sweep(report, paths[3])
    from _bench_headline import plot_headline

    if not plot_headline(report, paths[4]):
        paths.pop()  # the run did not measure the headline's point: the README keeps the chart it has
    return paths
