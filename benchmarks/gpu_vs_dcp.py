"""Save and load of CUDA state on one GPU: lightning_sharing against torch DCP, interleaved, median of rounds.

One process, no process group: a stack of ``nn.Linear`` layers on the GPU and their AdamW moments (``--size-gb``
decimal GB of float32 weights + ``exp_avg`` + ``exp_avg_sq``, 0.75 by default). Each round runs, in turn (forward
order in even rounds, reversed in odd ones, so the drift of the machine lands on both alike):

- ``ls``: ``CheckpointCoordinator([model, OptimizerState] REPLICATED).save_checkpoint`` (durable and committed
  when it returns), then ``load_checkpoint`` into the live CUDA tensors (checksums verified);
- ``dcp``: ``dcp.save(get_state_dict(model, optimizer))`` (``FileSystemWriter`` fsyncs its files), then
  ``dcp.load`` in place + ``set_state_dict``;
- ``ls_async`` and ``ls_async_bg`` (``background_staging=True``): the time ``save_checkpoint`` blocks (staging
  from the GPU into pinned memory; with background staging, until ``wait_staged()``, what the next optimizer step
  waits for at most) and until the save is committed. The saver is kept from round to round, as in training, so
  its pinned buffers are allocated in the first round only (the median is the steady state).

Before every load the weights and moments are zeroed on the GPU, and after it they are compared with the saved
values (``torch.equal``), outside the timed region: a load that did not restore everything fails the run.
Every timed region starts and ends with ``torch.cuda.synchronize()``. Loads read files the save just wrote, so
they come from the page cache for both libraries alike (no root access is assumed to drop it). Timings are
figures, not assertions: the exit status is non-zero only when something failed or was not restored.

    python benchmarks/gpu_vs_dcp.py [--size-gb 0.75] [--rounds 3] [--dir D] [--json out.json]

``scripts/gpu_check.sh`` runs it (``--rounds 3``) after the GPU tests and prints its table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

WIDTH = 2048  # 16 MiB float32 weight matrices
HERE = Path(__file__).resolve().parent


def build(size_gb: float, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Layers whose weights and AdamW moments take about ``size_gb`` GB on ``device``, moments populated."""
    layers = max(1, round(size_gb * 1e9 / (3 * 4 * WIDTH * (WIDTH + 1))))
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers))).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def live_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The weights and the AdamW moments (on the GPU), in a fixed order."""
    tensors = [p.detach() for p in model.parameters()]
    for param in model.parameters():
        tensors += [optimizer.state[param][key] for key in ("exp_avg", "exp_avg_sq")]
    return tensors


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    _synchronize()
    started = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - started


class Bench:
    def __init__(self, size_gb: float, root: Path, device: torch.device) -> None:
        from lightning_sharing import CheckpointCoordinator, OptimizerState, SharingPattern, StateComponent
        from lightning_sharing.distributed.async_save import BackgroundSaver

        self.device = device
        self.model, self.optimizer = build(size_gb, self.device)
        self.tensors = live_tensors(self.model, self.optimizer)
        self.bytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.reference = [t.clone() for t in self.tensors]
        self.root = root
        optimizer_state = OptimizerState(self.model, self.optimizer)
        components = [StateComponent("model", self.model, SharingPattern.REPLICATED),
                      StateComponent("optimizer", optimizer_state, SharingPattern.REPLICATED)]
        self.sync = CheckpointCoordinator(components)
        self.saver = BackgroundSaver()
        self.async_ = CheckpointCoordinator(components, async_save=self.saver)
        self.bg_saver = BackgroundSaver(background_staging=True)
        self.async_bg = CheckpointCoordinator(components, async_save=self.bg_saver)
        self.times: dict[str, list[float]] = {}

    def record(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def _scramble(self) -> None:
        with torch.no_grad():
            for tensor in self.tensors:
                tensor.zero_()

    def _check(self, what: str) -> None:
        # The live tensors may have been replaced by a load (an optimizer's state): look them up again.
        now = live_tensors(self.model, self.optimizer)
        wrong = [i for i, (a, b) in enumerate(zip(now, self.reference, strict=True)) if not torch.equal(a, b)]
        if wrong or any(t.device != self.device for t in now):
            raise AssertionError(f"{what}: {len(wrong)} of {len(now)} tensors not restored on {self.device}")
        self.tensors = now

    def _fresh(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def ls(self) -> None:
        path = self._fresh("ls.ckpt")
        self.record("ls save", timed(lambda: self.sync.save_checkpoint(path, step=1)))
        self._scramble()
        self.record("ls load", timed(lambda: self.sync.load_checkpoint(path)))
        self._check("ls load")
        shutil.rmtree(path)

    def dcp(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = self._fresh("dcp.ckpt")

        def save() -> None:
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

        def load() -> None:
            model_state, optim_state = get_state_dict(self.model, self.optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=path)  # in place
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

        self.record("dcp save", timed(save))
        self._scramble()
        self.record("dcp load", timed(load))
        self._check("dcp load")
        shutil.rmtree(path)

    def ls_async(self) -> None:
        path = self._fresh("async.ckpt")
        started = time.perf_counter()
        self.record("ls_async blocked", timed(lambda: self.async_.save_checkpoint(path, step=1)))
        self.async_.wait()
        self.record("ls_async committed", time.perf_counter() - started)
        shutil.rmtree(path)

    def ls_async_bg(self) -> None:
        path = self._fresh("async_bg.ckpt")
        started = time.perf_counter()
        self.record("ls_async_bg blocked", timed(lambda: self.async_bg.save_checkpoint(path, step=1)))
        self.bg_saver.wait_staged()
        self.record("ls_async_bg staged", time.perf_counter() - started)
        self.async_bg.wait()
        self.record("ls_async_bg committed", time.perf_counter() - started)
        shutil.rmtree(path)

    def close(self) -> None:
        self.saver.close()
        self.bg_saver.close()


def report(bench: Bench, rounds: int) -> dict[str, Any]:
    gb = bench.bytes / 1e9
    print(f"\n{gb:.2f} GB of {bench.device.type} tensors ({len(bench.tensors)} tensors), {rounds} interleaved rounds, "
          "median [min-max]:")
    medians = {name: statistics.median(values) for name, values in bench.times.items()}
    for name, values in bench.times.items():
        rate = f"{gb / medians[name]:6.2f} GB/s" if medians[name] > 0 else ""
        print(f"  {name:<22} {medians[name]:8.3f} s  [{min(values):.3f}-{max(values):.3f}]  {rate}")
    ratios = {what: medians[f"ls {what}"] / medians[f"dcp {what}"] for what in ("save", "load")}
    ratios["async blocked / ls save"] = medians["ls_async blocked"] / medians["ls save"]
    ratios["async_bg blocked / ls save"] = medians["ls_async_bg blocked"] / medians["ls save"]
    print("ratios (lower is better for lightning_sharing):")
    print(f"  save  ours/DCP {ratios['save']:.2f}x    load  ours/DCP {ratios['load']:.2f}x")
    print(f"  async save blocks {ratios['async blocked / ls save']:.2f}x of a sync save "
          f"({ratios['async_bg blocked / ls save']:.2f}x with background_staging)")
    return {"bytes": bench.bytes, "rounds": rounds, "times": bench.times, "median": medians, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.75, help="GB of weights + AdamW moments (default 0.75)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=HERE / ".scratch",
                        help="a folder on the disk to measure (default benchmarks/.scratch, removed afterwards)")
    parser.add_argument("--json", type=Path, default=None, help="also write the timings there")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a dry run of this script where there is no GPU (its figures say nothing of GPUs)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print(f"gpu_vs_dcp: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}); nothing measured",
              file=sys.stderr)
        return 2
    import lightning_sharing

    # dcp.save and dcp.load without a process group say so at every call: one process is the point here.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"gpu_vs_dcp: {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"lightning_sharing {getattr(lightning_sharing, '__version__', '?')}")
    args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="gpu_vs_dcp-", dir=args.dir))
    bench = Bench(args.size_gb, root, device)
    units = [bench.ls, bench.dcp, bench.ls_async, bench.ls_async_bg]
    try:
        for round_ in range(args.rounds):
            for unit in units if round_ % 2 == 0 else list(reversed(units)):
                unit()
            print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
        result = report(bench, args.rounds)
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            args.dir.rmdir()  # only if empty: another run's files stay
    result["device"] = name
    result["torch"] = torch.__version__
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
