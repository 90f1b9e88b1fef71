"""One rank of a two-rank Lightning run whose resume meets a stuck peer (driven by tests/test_fault_peer.py).

Both ranks train two steps with ``SharingStrategy(timeout=...)`` and save a checkpoint; then a second Trainer
resumes from it with ``LIGHTNING_SHARING_FAULTS=load:read@1:hang``: rank 1 blocks forever at its first file
read (its sockets stay open, as with a stuck NFS read), so rank 0 can only learn of it through the process
group's timeout. Rank 0 writes OUT/result-rank0.json with the error it got and how long it took.

Launched once per rank, with the rank on the command line: LOCAL_RANK set in the environment makes
Lightning treat the processes as launched externally (as under torchrun).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, required=True, help="SharingStrategy(timeout=...) in seconds")
    args = parser.parse_args()
    os.environ.update({"LOCAL_RANK": str(args.rank), "NODE_RANK": "0", "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(args.port)})

    import lightning.pytorch as pl
    import torch
    import torch.distributed as dist
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_sharing import SharingStrategy, find_latest_checkpoint
    from lightning_sharing._faults import FAULTS_ENV

    torch.set_num_threads(1)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def loader() -> torch.utils.data.DataLoader:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)

    def trainer(max_steps: int, callbacks: list) -> pl.Trainer:
        strategy = SharingStrategy(timeout=datetime.timedelta(seconds=args.timeout))
        return pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_steps=max_steps, callbacks=callbacks,
                          enable_checkpointing=bool(callbacks), logger=False, enable_progress_bar=False,
                          enable_model_summary=False)

    checkpoints = args.out / "checkpoints"
    first = trainer(2, [ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=2)])
    first.fit(Module(), loader())
    backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    result = {"strategy_timeout": first.strategy._timeout.total_seconds(),
              "process_group_timeout": backend.options._timeout.total_seconds()}
    latest = find_latest_checkpoint(checkpoints)
    result["resume_from"] = str(latest)

    os.environ[FAULTS_ENV] = "load:read@1:hang"
    second = trainer(4, [])
    started = time.monotonic()
    try:
        second.fit(Module(), loader(), ckpt_path=latest)
        result["error"] = None
    except Exception as exc:  # the test checks what rank 0 saw
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = time.monotonic() - started
    result["global_step"] = second.global_step
    (args.out / f"result-rank{args.rank}.json").write_text(json.dumps(result, indent=1))
    os._exit(0)  # the process group is broken (its peer is stuck): skip interpreter teardown


if __name__ == "__main__":
    main()
