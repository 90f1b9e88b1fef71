"""Checkpoint benchmark: lightning_sharing vs the raw disk, Lightning's built-in path and torch.distributed.checkpoint.

    python benchmarks/bench_checkpoint.py [--sizes 0.25 0.5 1.5] [--worlds 1 2 4] [--repeats 3] [--dir D] [--out O]

For every size (GB of float32 weights + AdamW exp_avg + exp_avg_sq) and world size (gloo CPU processes, each holding
the full replicated state as under DDP), every variant runs in fresh processes; see benchmarks/README.md for the
variants and columns. Writes OUT/results.json, results.md and results.png, and prints each ratio as it is measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, so this directory is on sys.path and the _bench_* helpers next to it import directly.
from _bench_launch import VariantFailed, aggregate, run_variant
from _bench_report import CHECKS, check_line, check_rows, metrics_of, write_outputs
from _bench_state import FLOAT32_COPIES, layer_plan

HERE = Path(__file__).resolve().parent

# Order matters: a load variant reads the checkpoint its save variant left, right after it was written (so every
# load finds its files equally warm in the page cache); the raw baseline needs the byte count of the LS checkpoint;
# the validation variants run next to the unvalidated save they are compared with.
PLAN: list[tuple[str, str | None]] = [  # (variant, the variant it needs)
    ("ls_sync", None), ("ls_load", "ls_sync"), ("ls_quick", None), ("ls_tensor", None), ("ls_async", None),
    ("raw", None), ("lightning_save", None), ("lightning_load", "lightning_save"), ("dcp_save", None),
    ("dcp_load", "dcp_save"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.5], help="state sizes in GB")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of processes")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--dir", type=Path, default=HERE / ".scratch",
                        help="where checkpoints are written (every variant uses it; emptied afterwards)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks", help="results directory")
    parser.add_argument("--variants", nargs="+", choices=[v for v, _ in PLAN], help="only these (default: all)")
    parser.add_argument("--no-gil-probe", action="store_true", help="skip the loop-rate probe during async saves")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a variant counts as hung")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.worlds) < 1 or min(args.sizes) <= 0:
        parser.error("--repeats, --worlds and --sizes must be positive")
    return args


# ---------------------------------------------------------------------------------------------- machine
def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _filesystem(path: Path) -> str:
    """The type and device of the mount holding ``path`` (longest matching mount point)."""
    best = ("", "unknown", "?")
    for line in _read("/proc/mounts").splitlines():
        device, mount, fstype = line.split()[:3]
        if str(path).startswith(mount) and len(mount) >= len(best[0]):
            best = (mount, fstype, device)
    return f"{best[1]} on {best[2]}, mounted at {best[0]}"


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "lightning_sharing"], cwd=HERE.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"git {head}" + (" + uncommitted changes in lightning_sharing/" if dirty else "")


def machine_info(directory: Path) -> dict[str, Any]:
    import lightning
    import safetensors
    import torch

    import lightning_sharing

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), 0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "cpu_model": cpu, "mem_total_gib": mem / 2**20, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "safetensors": safetensors.__version__, "lightning_sharing": lightning_sharing.__version__, "git": _git(),
        "filesystem": _filesystem(directory.resolve()), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "page_cache": "page cache warm (no root to drop caches): loads read what was just written, from memory",
    }


# ---------------------------------------------------------------------------------------------- running
def estimated_state_bytes(size_gb: float) -> int:
    width, layers = layer_plan(size_gb)
    return width * (width + 1) * layers * 4 * FLOAT32_COPIES


def async_available() -> bool:
    import inspect

    from lightning_sharing import CheckpointCoordinator

    return "async_save" in inspect.signature(CheckpointCoordinator.__init__).parameters


def run_point(args: argparse.Namespace, size: float, world: int, scratch: Path) -> dict[str, Any]:
    """Every variant at one (size, world); returns the point's summaries, metrics and check rows."""
    root = scratch / f"size{size:g}-world{world}"
    variants: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    printed: set[str] = set()
    wanted = set(args.variants or [v for v, _ in PLAN])
    for variant, needs in PLAN:
        if variant not in wanted:
            continue
        if needs and "error" in variants.get(needs, {"error": "not run"}):
            variants[variant] = {"error": f"skipped: {needs} did not produce a checkpoint"}
        elif variant == "ls_async" and not async_available():
            variants[variant] = {"error": "not available: CheckpointCoordinator has no async_save parameter yet"}
        else:
            raw_bytes = metrics.get("ls_sync.ckpt_bytes", estimated_state_bytes(size))
            spec = {"variant": variant, "size_gb": size, "repeats": args.repeats, "root": str(root),
                    "raw_bytes": int(raw_bytes), "gil_probe": not args.no_gil_probe,
                    "pg_timeout_s": args.timeout}
            started = time.perf_counter()
            try:
                summary = aggregate(run_variant(spec, world, root / "logs", args.timeout))
            except VariantFailed as exc:
                variants[variant] = {"error": str(exc)}
            else:
                summary["wall_s"] = time.perf_counter() - started
                variants[variant] = summary
                metrics.update(metrics_of(variant, summary))
        report_variant(variant, variants[variant])
        for check in CHECKS:
            line = check_line(check, metrics)
            if line and check.name not in printed:
                printed.add(check.name)
                print(line, flush=True)
    state = next((v["info"]["state_bytes"] for v in variants.values() if "state_bytes" in v.get("info", {})), None)
    return {"size_gb": size, "world": world, "state_bytes": state, "variants": variants, "metrics": metrics,
            "checks": check_rows(metrics, variants)}


def report_variant(variant: str, summary: dict[str, Any]) -> None:
    if "error" in summary:
        print(f"  {variant}: {summary['error']}", flush=True)
        return
    times = ", ".join(f"{name} {value:.3f}s" for name, value in summary["median"].items())
    extra = summary["mem_extra"] / 2**20
    info = summary["info"]
    writers = f", {info['ckpt_bytes'] / 2**20:,.1f} MiB on disk by {info['writer_ranks']} rank(s)" \
        if "ckpt_bytes" in info else ""
    print(f"  {variant}: {times}; peak extra RSS {extra:,.1f} MiB{writers}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = args.dir.resolve() / f"run-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(scratch), "points": [],
                              "config": {"sizes": args.sizes, "worlds": args.worlds, "repeats": args.repeats,
                                         "dir": str(args.dir), "variants": args.variants or [v for v, _ in PLAN]}}
    print(f"checkpoints under {scratch} ({report['machine']['filesystem']}); page cache warm; "
          f"median of {args.repeats}", flush=True)
    failed = False
    try:
        for size in args.sizes:
            for world in args.worlds:
                print(f"== {size:g} GB, world size {world}", flush=True)
                point = run_point(args, size, world, scratch)
                failed |= any("error" in v and not v["error"].startswith("not available")
                              for v in point["variants"].values())
                report["points"].append(point)
    finally:
        # Logs of a failed run stay for a look; checkpoints never do (a failed variant may have left one behind).
        if failed:
            _remove_checkpoints(scratch)
            print(f"some variants failed; their logs are under {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
            _remove_if_empty(args.dir)
    for path in write_outputs(report, args.out):
        print(f"wrote {path}")
    return 1 if failed else 0


def _remove_checkpoints(scratch: Path) -> None:
    for point in scratch.iterdir():
        for entry in point.iterdir() if point.is_dir() else ():
            if entry.name != "logs":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (another run, or the user's files) or already gone


if __name__ == "__main__":
    sys.exit(main())
