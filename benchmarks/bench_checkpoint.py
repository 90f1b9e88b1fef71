"""Checkpoint benchmark: lightning_sharing vs the raw disk, Lightning's built-in path and torch.distributed.checkpoint.

    python benchmarks/bench_checkpoint.py [--sizes 0.25 0.5 1.5] [--worlds 1 2 4] [--repeats 3] [--dir D] [--out O]

For every size (GB of float32 weights + AdamW exp_avg + exp_avg_sq) and world size (gloo CPU processes, each holding
the full replicated state as under DDP), every variant runs in fresh processes; see benchmarks/README.md for the
variants and columns. Writes OUT/results.json, results.md and results.png, and prints each ratio as it is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, so this directory is on sys.path and the _bench_* helpers next to it import directly.
from _bench_launch import VariantFailed, aggregate, run_launch
from _bench_report import CHECKS, check_line, check_rows, metrics_of, write_outputs
from _bench_state import FLOAT32_COPIES, layer_plan

HERE = Path(__file__).resolve().parent

# A launch is one set of processes holding one state; its units run interleaved, in rounds (see _bench_worker.py). A
# unit is a save and the load that reads what it wrote, or one variant alone.
REPLICATED_UNITS = [["ls_sync", "ls_load"], ["raw"], ["lightning_save", "lightning_load"], ["dcp_save", "dcp_load"],
                    ["ls_async"], ["ls_async_bg"], ["dcp_async"], ["ls_quick"], ["ls_tensor"]]
SHARDED_UNITS = [["sh_ls_save", "sh_ls_load"], ["sh_dcp_save", "sh_dcp_load"]]
RESHARD_UNITS = [["sh_ls_reshard"], ["sh_dcp_reshard"]]
ALL_VARIANTS = [v for units in (REPLICATED_UNITS, SHARDED_UNITS, RESHARD_UNITS) for unit in units for v in unit]
QUICK = {"sizes": [0.05, 0.2], "worlds": [1, 2, 4], "repeats": 2}
# Peak resident bytes per rank / state bytes: the state, the async variants' staging buffers (kept between saves), and
# a transient third copy (Lightning's load, DCP's async staging). 2.2 let 4 GB on 2 ranks start on a quiet 24 GiB
# machine, where the kernel killed rank 0.
MEMORY_PER_STATE = 3.0
MEMORY_RANK0_EXTRA = 1.9  # what Lightning's save (rank 0 alone) adds on top of its state, per state byte
MEMORY_HEADROOM_GIB = 6.0  # for the page cache and whatever else runs on the machine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.1, 0.5, 1.5, 4.0],
                        help="state sizes in GB (a point that would not fit in the free memory is skipped)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of processes")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per launch; the median is reported")
    parser.add_argument("--quick", action="store_true",
                        help=f"a fast check: sizes {QUICK['sizes']}, worlds {QUICK['worlds']}, "
                             f"{QUICK['repeats']} rounds, no loop-rate probe (unless given explicitly)")
    parser.add_argument("--reshard-from", type=int, default=2,
                        help="the world size whose SHARDED checkpoints every larger world size loads (resharded)")
    parser.add_argument("--dir", type=Path, default=HERE / ".scratch",
                        help="where checkpoints are written (every variant uses it; emptied afterwards)")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks", help="results directory")
    parser.add_argument("--variants", nargs="+", choices=ALL_VARIANTS,
                        help="only the units holding these (a save brings its load along; default: all)")
    parser.add_argument("--no-gil-probe", action="store_true", help="skip the loop-rate probe during async saves")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a variant counts as hung")
    parser.add_argument("--note", default="", help="a line for results.md about the conditions (a shared machine...)")
    parser.add_argument("--render", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="measure nothing: write results.md and the plots again from results.json files (the "
                             "points of several runs merged, the first file's point where two measured the same)")
    given = set(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if f"--{name}" not in given:
                setattr(args, name, value)
        args.no_gil_probe = True
    args.worlds = sorted(set(args.worlds))  # the reshard source runs before the larger world sizes
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


def fits(size: float, world: int) -> bool:
    """Whether ``world`` ranks of ``size`` GB fit in the memory available now, with headroom for the rest."""
    available = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                      if line.startswith("MemAvailable:")), None)
    if available is None:
        return True
    needed = max(world * MEMORY_PER_STATE, world + MEMORY_RANK0_EXTRA) * size * 1e9
    return needed <= available - MEMORY_HEADROOM_GIB * 2**30


def _selected(units: list[list[str]], wanted: set[str]) -> list[list[str]]:
    return [unit for unit in units if wanted & set(unit)]


def launches(args: argparse.Namespace, size: float, world: int, scratch: Path) -> list[dict[str, Any]]:
    """The launches of one (size, world) point: the replicated state's, then the sharded state's."""
    wanted = set(args.variants or ALL_VARIANTS)
    base = {"size_gb": size, "repeats": args.repeats, "root": str(scratch / f"size{size:g}-world{world}"),
            "raw_bytes": estimated_state_bytes(size), "gil_probe": not args.no_gil_probe,
            "pg_timeout_s": args.timeout, "state_bytes": estimated_state_bytes(size)}
    out = []
    if units := _selected(REPLICATED_UNITS, wanted):
        out.append({**base, "name": "replicated", "kind": "replicated", "units": units})
    units = _selected(SHARDED_UNITS, wanted)
    if world > args.reshard_from and args.reshard_from in args.worlds:
        units += _selected(RESHARD_UNITS, wanted)
    if units:
        out.append({**base, "name": "sharded", "kind": "sharded", "units": units,
                    "keep_for_reshard": world == args.reshard_from and any(w > world for w in args.worlds),
                    "reshard_from": str(scratch / f"size{size:g}-world{args.reshard_from}"),
                    "reshard_world": args.reshard_from})
    return out


def run_point(args: argparse.Namespace, size: float, world: int, scratch: Path) -> dict[str, Any]:
    """Every launch at one (size, world); returns the point's summaries, metrics and check rows."""
    variants: dict[str, dict[str, Any]] = {}
    metrics: dict[str, float] = {}
    printed: set[str] = set()
    for spec in launches(args, size, world, scratch):
        started = time.perf_counter()
        try:
            per_variant = run_launch(spec, world, Path(spec["root"]) / "logs", args.timeout)
        except VariantFailed as exc:
            for unit in spec["units"]:
                for variant in unit:
                    variants[variant] = {"error": str(exc)}
        else:
            wall = time.perf_counter() - started
            for variant, per_rank in per_variant.items():
                variants[variant] = {**aggregate(per_rank), "launch_wall_s": wall}
                metrics.update(metrics_of(variant, variants[variant]))
        for unit in spec["units"]:
            for variant in unit:
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
    times = ", ".join(f"{name} {value:.3f}s [{summary['spread'][name][0]:.3f}-{summary['spread'][name][1]:.3f}]"
                      for name, value in summary["median"].items())
    extra = summary["mem_extra"] / 2**20
    info = summary["info"]
    writers = f", {info['ckpt_bytes'] / 2**20:,.1f} MiB on disk" if "ckpt_bytes" in info else ""
    if "writer_ranks" in info:
        writers += f" by {info['writer_ranks']} rank(s)"
    print(f"  {variant}: {times}; peak extra RSS {extra:,.1f} MiB{writers}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        report = merge_reports([json.loads(path.read_text()) for path in args.render])
        if args.note:
            report["config"]["note"] = args.note
        for path in write_outputs(report, args.out):
            print(f"wrote {path}")
        return 0
    scratch = args.dir.resolve() / f"run-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(scratch), "points": [],
                              "config": {"sizes": args.sizes, "worlds": args.worlds, "repeats": args.repeats,
                                         "dir": str(args.dir), "variants": args.variants or ALL_VARIANTS,
                                         "quick": args.quick, "reshard_from": args.reshard_from, "skipped": [],
                                         "note": args.note}}
    print(f"checkpoints under {scratch} ({report['machine']['filesystem']}); page cache warm; "
          f"median [min-max] of {args.repeats} interleaved rounds", flush=True)
    run_started = time.perf_counter()
    failed = False
    try:
        for size in args.sizes:
            for world in args.worlds:
                if not fits(size, world):
                    print(f"== {size:g} GB, world size {world}: skipped (would not fit in the free memory)",
                          flush=True)
                    report["config"]["skipped"].append([size, world])
                    continue
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
    report["config"]["wall_s"] = time.perf_counter() - run_started
    print(f"whole run: {report['config']['wall_s'] / 60:.1f} min", flush=True)
    for path in write_outputs(report, args.out):
        print(f"wrote {path}")
    return 1 if failed else 0


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report of the points of several runs; the first run's machine, and its point where two share one."""
    merged = json.loads(json.dumps(reports[0]))
    seen = {(p["size_gb"], p["world"]) for p in merged["points"]}
    for other in reports[1:]:
        for point in other["points"]:
            if all("error" in v for v in point["variants"].values()):
                continue  # nothing measured there (it failed, or was stopped)
            if (point["size_gb"], point["world"]) not in seen:
                seen.add((point["size_gb"], point["world"]))
                merged["points"].append({**point, "run": other["machine"]["date"]})
    config = merged["config"]
    config["sizes"] = sorted({p["size_gb"] for p in merged["points"]})
    config["worlds"] = sorted({p["world"] for p in merged["points"]})
    config["skipped"] = [s for s in config.get("skipped", []) if tuple(s) not in seen]
    config["merged_from"] = [{"date": r["machine"]["date"], "git": r["machine"]["git"],
                              "wall_s": r["config"].get("wall_s")} for r in reports]
    merged["points"].sort(key=lambda p: (p["size_gb"], p["world"]))
    for point in merged["points"]:  # the checks of today's code, from the numbers measured
        ok = {v: s for v, s in point["variants"].items() if "error" not in s}
        point["metrics"] = {k: v for variant, summary in ok.items() for k, v in metrics_of(variant, summary).items()}
        point["checks"] = check_rows(point["metrics"], point["variants"])
    return merged


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
