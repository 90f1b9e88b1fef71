"""headline.png: the README's one chart: save, load and training-blocked time of an async save, at one size.

lightning_sharing against torch DCP and Lightning's built-in checkpointing (``torch.save`` + fsync) on the same
state, world size and machine, from one run of ``bench_checkpoint.py`` (its results.json). Each bar is the median
of the interleaved rounds, its whisker the min-max. Lightning has no async save: its bar there is its sync save,
which is what training waits for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADLINE_SIZE_GB = 0.5
HEADLINE_WORLD = 2

# (group, [(variant, quantity, colour)]): the colour names the system (LEGEND)
GROUPS: list[tuple[str, list[tuple[str, str, str]]]] = [
    ("save (durable)", [("ls_sync", "save", "C0"), ("dcp_save", "save", "C1"), ("lightning_save", "durable", "C2")]),
    ("load", [("ls_load", "load", "C0"), ("dcp_load", "load", "C1"), ("lightning_load", "load", "C2")]),
    ("async save: training blocked", [("ls_async", "blocked", "C0"), ("ls_async_bg", "blocked", "C9"),
                                      ("dcp_async", "blocked", "C1"), ("lightning_save", "durable", "C2")]),
]
LEGEND = {"C0": "lightning_sharing (load: checksums verified)", "C9": "lightning_sharing, background staging",
          "C1": "torch DCP", "C2": "Lightning built-in (torch.save + fsync; no async save: training waits for it)"}


def _bar(point: dict[str, Any], variant: str, quantity: str) -> tuple[float, float, float] | None:
    """(median, low, high) seconds of one variant's quantity at ``point``; None when it was not measured."""
    summary = point["variants"].get(variant)
    if not summary or "error" in summary or quantity not in summary.get("median", {}):
        return None
    low, high = summary["spread"][quantity]
    return summary["median"][quantity], low, high


def headline_point(report: dict[str, Any], size_gb: float = HEADLINE_SIZE_GB,
                   world: int = HEADLINE_WORLD) -> dict[str, Any] | None:
    """The (size, world) point the headline shows, or None when the run did not measure it."""
    return next((p for p in report["points"] if p["world"] == world and p["size_gb"] == size_gb), None)


def plot_headline(report: dict[str, Any], path: Path, size_gb: float = HEADLINE_SIZE_GB,
                  world: int = HEADLINE_WORLD) -> bool:
    """Draw headline.png at ``path``; False (nothing drawn) when the run has no such point."""
    point = headline_point(report, size_gb, world)
    if point is None:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    x, ticks, labels_seen = 0.0, [], set()
    for group, bars in GROUPS:
        start = x
        for variant, quantity, colour in bars:
            found = _bar(point, variant, quantity)
            if found is not None:
                value, low, high = found
                # One legend entry per system (colour): the group names the measurement.
                shown = LEGEND[colour] if colour not in labels_seen else None
                labels_seen.add(colour)
                ax.bar(x, value, 0.8, color=colour, label=shown, yerr=[[value - low], [high - value]], capsize=2)
                ax.annotate(f"{value:.2f} s", (x, high), ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
            x += 1
        ticks.append(((start + x - 1) / 2, group))
        x += 0.8
    ax.set_xticks([t for t, _ in ticks], [g for _, g in ticks])
    ax.set_ylabel("seconds (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.45)  # room for the legend above the bars
    machine = report["machine"]
    gib = point["state_bytes"] / 2**30 if point.get("state_bytes") else size_gb
    ax.set_title(f"{gib:.2f} GiB of weights + AdamW state, {world} gloo ranks on CPU; "
                 f"\n{machine['cpu_count']}-core {machine['cpu_model']}, {machine['mem_total_gib']:.0f} GiB RAM, "
                 f"{machine.get('filesystem', 'local disk')};\n"
                 f"median of {report['config']['repeats']} interleaved rounds, whiskers min-max "
                 f"({machine['date'][:10]}, {machine.get('git', 'git ?')})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
