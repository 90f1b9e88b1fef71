"""Checkpoints read over http(s), for tests/integration/test_http_checkpoints.py (one process, one JSON line out).

A checkpoint directory saved on disk is served by Python's ``http.server`` (no Range support: the whole file comes
back and the client cuts the part it asked for); the core load, discovery, ``verify``, a refused save, a Trainer
resuming from the URL and ``load_from_checkpoint(url)`` run against it. At the end the threads alive are listed:
no fsspec event loop may be left behind.
"""

from __future__ import annotations

import functools
import http.server
import json
import sys
import threading
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointManifest,
    SharingStrategy,
    StateComponent,
    find_latest_checkpoint,
)
from lightning_sharing.cli import main as cli


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_train_start(self) -> None:
        self.started_at = self.global_step  # a resumed fit starts at the checkpoint's step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def trainer(steps: int) -> pl.Trainer:
    return pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=1, max_steps=steps, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def main(root: Path) -> None:
    out: dict = {}
    model = nn.Linear(4, 3)
    CheckpointCoordinator([StateComponent("model", model, "replicated")]).save_checkpoint(
        root / "core" / "step=3.ckpt", step=3)
    first = trainer(2)
    module = Module()
    first.fit(module)
    first.save_checkpoint(root / "lightning" / "step=2.ckpt")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    serving = threading.Thread(target=server.serve_forever, daemon=True, name="test-http-server")
    serving.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    fresh = nn.Linear(4, 3)
    result = CheckpointCoordinator([StateComponent("model", fresh, "replicated")]).load_checkpoint(
        f"{base}/core/step=3.ckpt")
    out["core_loaded"] = result.loaded
    out["core_equal"] = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                fresh.state_dict().values(), strict=True))
    out["latest"] = find_latest_checkpoint(f"{base}/core")
    out["step"] = CheckpointManifest.load(f"{base}/core/step=3.ckpt").step
    out["verify"] = cli(["verify", f"{base}/core/step=3.ckpt"])
    try:
        CheckpointCoordinator([StateComponent("model", fresh, "replicated")]).save_checkpoint(
            f"{base}/core/step=4.ckpt")
        out["save"] = "saved"
    except Exception as exc:
        out["save"] = f"{type(exc).__name__}: {exc}"

    resumed = trainer(4)
    again = Module()
    resumed.fit(again, ckpt_path=f"{base}/lightning/step=2.ckpt")
    out["resumed_at_step"] = again.started_at
    out["resumed_to_step"] = resumed.global_step
    loaded = Module.load_from_checkpoint(f"{base}/lightning/step=2.ckpt")
    out["load_from_checkpoint_equal"] = all(torch.equal(a, b) for a, b in zip(
        module.state_dict().values(), loaded.state_dict().values(), strict=True))
    server.shutdown()
    serving.join()
    out["threads"] = sorted(t.name for t in threading.enumerate() if t.is_alive() and t is not threading.main_thread())
    print(json.dumps(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
