"""sweep.png: how cost grows with state size and world size, per GB, for lightning_sharing, DCP and Lightning.

One column per world size; rows: save seconds per GB, load seconds per GB, async-blocked seconds per GB, validation
overhead, and peak extra resident memory per rank. Each point is a median over the interleaved rounds, with its
min-max as an error bar; the raw disk (durable write, read) is drawn as the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (row title, unit, [(label, variant, quantity, style)])
ROWS: list[tuple[str, str, list[tuple[str, str, str, str]]]] = [
    ("save (durable)", "s/GB", [
        ("ours, REPLICATED", "ls_sync", "save", "C0-o"), ("ours, SHARDED (FSDP2)", "sh_ls_save", "save", "C0--s"),
        ("DCP", "dcp_save", "save", "C1-o"), ("DCP, FSDP2", "sh_dcp_save", "save", "C1--s"),
        ("Lightning + fsync", "lightning_save", "durable", "C2-o"), ("raw durable write", "raw", "write", "k:"),
        ("raw, early write-back", "raw", "write_early", "k--")]),
    ("load", "s/GB", [
        ("ours, REPLICATED (verified)", "ls_load", "load", "C0-o"), ("ours, SHARDED", "sh_ls_load", "load", "C0--s"),
        ("ours, resharded", "sh_ls_reshard", "load", "C0:^"), ("DCP", "dcp_load", "load", "C1-o"),
        ("DCP, FSDP2", "sh_dcp_load", "load", "C1--s"), ("DCP, resharded", "sh_dcp_reshard", "load", "C1:^"),
        ("Lightning", "lightning_load", "load", "C2-o"), ("raw read", "raw", "read", "k:")]),
    ("async save: training blocked", "s/GB", [
        ("ours", "ls_async", "blocked", "C0-o"), ("ours, background staging", "ls_async_bg", "blocked", "C0--s"),
        ("ours, background staging: until staged", "ls_async_bg", "staged", "C0:^"),
        ("DCP async_save", "dcp_async", "blocked", "C1-o")]),
    ("validation overhead", "%", [
        ("QUICK", "ls_quick", "overhead", "C0-o"), ("TENSOR", "ls_tensor", "overhead", "C3-o")]),
    ("peak extra RSS per rank", "MiB", [
        ("ours save", "ls_sync", "mem", "C0-o"), ("ours load", "ls_load", "mem", "C0--o"),
        ("ours async", "ls_async", "mem", "C0:o"), ("ours SHARDED save", "sh_ls_save", "mem", "C0-s"),
        ("DCP save", "dcp_save", "mem", "C1-o"), ("DCP load", "dcp_load", "mem", "C1--o"),
        ("DCP async", "dcp_async", "mem", "C1:o"), ("Lightning save", "lightning_save", "mem", "C2-o"),
        ("Lightning load", "lightning_load", "mem", "C2--o")]),
]


def _value(point: dict[str, Any], variant: str, quantity: str) -> tuple[float, float, float] | None:
    """(value, low, high) of one series at one point, per GB for times; None when not measured."""
    summary = point["variants"].get(variant)
    if not summary or "error" in summary:
        return None
    if quantity == "mem":
        mib = summary["mem_extra"] / 2**20
        return mib, mib, mib
    if quantity == "overhead":
        checked, plain = summary["median"].get("save"), summary["median"].get("save_none")
        if not checked or not plain:
            return None
        pct = 100 * (checked / plain - 1)
        return pct, pct, pct
    if quantity not in summary["median"]:
        return None
    gigabytes = (point["state_bytes"] or point["size_gb"] * 1e9) / 1e9
    low, high = summary["spread"][quantity]
    return summary["median"][quantity] / gigabytes, low / gigabytes, high / gigabytes


def plot_sweep(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    worlds = report["config"]["worlds"]
    fig, axes = plt.subplots(len(ROWS), len(worlds), figsize=(5.2 * len(worlds), 3.3 * len(ROWS)), squeeze=False)
    for col, world in enumerate(worlds):
        points = sorted((p for p in report["points"] if p["world"] == world), key=lambda p: p["size_gb"])
        for row, (title, unit, series) in enumerate(ROWS):
            ax = axes[row, col]
            for label, variant, quantity, style in series:
                found = [(p["size_gb"], v) for p in points if (v := _value(p, variant, quantity)) is not None]
                if not found:
                    continue
                xs = [x for x, _ in found]
                ys = [v[0] for _, v in found]
                errors = [[v[0] - v[1] for _, v in found], [v[2] - v[0] for _, v in found]]
                ax.errorbar(xs, ys, yerr=errors, fmt=style, label=label, markersize=4, capsize=2, linewidth=1)
            ax.set_xscale("log")
            if unit == "MiB":  # ours stay within a few MiB while Lightning's reach GBs: both must be readable
                ax.set_yscale("symlog", linthresh=10)
                ax.set_ylim(bottom=0)
            note = ": noise floor (nothing to compare)" if unit == "%" and world == 1 else ""
            ax.set_title(f"{title}, world size {world}{note}", fontsize=8 if note else 9)
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if row == len(ROWS) - 1:
                ax.set_xlabel("state size (GB: weights + AdamW moments)")
            if col == len(worlds) - 1 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    machine = report["machine"]
    fig.suptitle(f"Cost per GB as the state grows: median of {report['config']['repeats']} interleaved rounds, "
                 f"bars min-max ({machine['cpu_count']} CPUs, {machine['mem_total_gib']:.0f} GiB, {machine['date']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
