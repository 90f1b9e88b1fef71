"""A Lightning DDP run (2 CPU processes, Lightning's own launcher) checkpointing to S3 with ModelCheckpoint.

    python tests/scripts/lightning_s3.py --url s3://bucket/p/run --out DIR --max-steps 25 [--kill-at-step 17]
        [--ckpt-path last|URL] [--fallback] [--endpoint http://127.0.0.1:PORT] [--proxy http://...] [--checks]

The model, data and schedule are examples/lightning_ddp.py's (dropout, AdamW + warm-up/cosine, a shuffled
StatefulDataLoader, a PER_RANK torchmetrics metric); the only S3-specific lines are
``ModelCheckpoint(dirpath="s3://...")`` and, with ``--endpoint``, ``SharingStrategy(storage_options=...)``: the
endpoint and credentials then come from those options only (the test removes them from the environment). Without
``--endpoint`` they come from the environment (``AWS_ENDPOINT_URL``, ...).

``ModelCheckpoint(filename="{step}", every_n_train_steps=5, save_top_k=2, monitor="step", mode="max",
save_last=True)``: ``step=N.ckpt`` every 5 steps, the two newest kept, ``last.ckpt`` replaced at each save.
``--kill-at-step N`` SIGKILLs every process at step N. Each rank writes ``OUT/final-rank{r}.safetensors`` and
``.json`` (examples/lightning_ddp.py's ``dump_final_state``) and ``OUT/report-rank{r}.json``.

``--checks`` (after ``fit``): ``trainer.save_checkpoint`` with per-call storage options naming ``--proxy`` as the
endpoint (``SAVED_THROUGH_PROXY``), and one with the strategy's; retention asked to remove the newest checkpoint,
one outside the ModelCheckpoint directory and a prefix of objects lightning_sharing did not write (each must
stay, with a logged reason, and training must not fail); ``validate(ckpt_path="best")``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from lightning_ddp import KillAtStep, TinyRegression, dump_final_state, make_dataloader  # noqa: E402

from lightning_sharing import SharingStrategy, find_latest_checkpoint  # noqa: E402
from lightning_sharing.storage import store_for  # noqa: E402

warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

SAVED_THROUGH_PROXY = "manual/through-proxy.ckpt"
SAVED_DIRECTLY = "manual/direct.ckpt"
FOREIGN = "notes.ckpt"
# Where botocore would find an endpoint or credentials in the environment (the test removes them with --endpoint).
AWS_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_REGION")


def storage_options(endpoint: str | None) -> dict[str, Any] | None:
    """Everything the S3 client needs, explicitly: nothing comes from the environment."""
    if not endpoint:
        return None
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"}}


class Module(TinyRegression):
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)


def _exists(url: str, options: dict[str, Any] | None) -> bool:
    store = store_for(url, options)  # its listings are fresh: no cache to invalidate
    location = store.normalize(url)
    return store.is_dir(location) or store.size(location) is not None


def checks(trainer: pl.Trainer, module: Module, args: argparse.Namespace, options: dict[str, Any] | None,
           report: dict[str, Any]) -> None:
    base = args.url.rsplit("/", 1)[0]
    # Per-call storage options win over the strategy's for that save (the test counts what reached the proxy).
    trainer.save_checkpoint(f"{base}/{SAVED_THROUGH_PROXY}", weights_only=False,
                            storage_options={**(options or {}), "endpoint_url": args.proxy})
    trainer.save_checkpoint(f"{base}/{SAVED_DIRECTLY}", weights_only=False)
    newest = find_latest_checkpoint(args.url, storage_options=options)
    foreign = f"{args.url}/{FOREIGN}"
    if trainer.is_global_zero:
        store = store_for(foreign, options)
        with store.open_write(store.join(store.normalize(foreign), "readme.txt")) as sink:
            sink.write(b"not a checkpoint")
    trainer.strategy.barrier("foreign object written")
    removals = {"newest": newest, "outside": f"{base}/{SAVED_THROUGH_PROXY}", "foreign": foreign}
    for target in removals.values():
        trainer.strategy.remove_checkpoint(target)  # rank 0 acts; what it keeps is logged
    trainer.strategy.barrier("removals done")
    report["removals"] = {name: {"target": target, "still_there": _exists(target, options)}
                          for name, target in removals.items()}
    val = DataLoader(TensorDataset(torch.randn(16, 8, generator=torch.Generator().manual_seed(3)), torch.zeros(16, 1)),
                     batch_size=8)
    report["validate"] = trainer.validate(module, dataloaders=val, ckpt_path="best", verbose=False)[0]
    report["validated_from"] = str(trainer.ckpt_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the ModelCheckpoint directory (s3://...)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--ckpt-path", default=None)
    parser.add_argument("--fallback", action="store_true")
    parser.add_argument("--endpoint", default=None, help="pass the endpoint and credentials as storage_options")
    parser.add_argument("--proxy", default=None)
    parser.add_argument("--checks", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    pl.seed_everything(7, workers=True)
    args.out.mkdir(parents=True, exist_ok=True)
    options = storage_options(args.endpoint)
    callback = ModelCheckpoint(dirpath=args.url, filename="{step}", every_n_train_steps=5, save_top_k=2,
                               monitor="step", mode="max", save_last=True)
    callbacks: list[Callback] = [callback]
    if args.kill_at_step:
        callbacks.append(KillAtStep(args.kill_at_step))
    trainer = pl.Trainer(
        strategy=SharingStrategy(storage_options=options, fallback=args.fallback),
        accelerator="cpu", devices=2, max_steps=args.max_steps, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    module = Module(total=args.max_steps)
    trainer.fit(module, train_dataloaders=make_dataloader(), ckpt_path=args.ckpt_path)
    report: dict[str, Any] = {"resumed_from": str(trainer.ckpt_path), "global_step": trainer.global_step,
                              "best_k": sorted(callback.best_k_models), "last": callback.last_model_path,
                              "aws_environment": sorted(name for name in os.environ if name in AWS_SETTINGS)}
    dump_final_state(module, trainer, args.out)
    if args.checks:
        checks(trainer, module, args, options, report)
    (args.out / f"report-rank{trainer.global_rank}.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
