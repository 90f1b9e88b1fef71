"""The smallest lightning_sharing setup: one process, one device, resume from "last".

    python examples/lightning_single_device.py --out runs/single --max-steps 20
    python examples/lightning_single_device.py --out runs/single --max-steps 40 --resume

Train 20 steps (a checkpoint every 5), then continue the same run to 40 steps from ``last.ckpt``.
``SharingStrategy()`` on one device is DDP with a single process: the checkpoint is the same
directory format as on many devices (model weights as Hugging Face safetensors, optimizer, LR
scheduler, dataloader position, RNG, Lightning's loop state), and the resumed run continues exactly
where the first one stopped. The model and data come from ``examples/lightning_ddp.py``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_ddp import TinyRegression, make_dataloader  # the example beside this one

from lightning_sharing import CheckpointManifest, SharingStrategy

# Upstream deprecation notices on torch 2.13 (torchdata's set_vital, Lightning's pytree helper): not ours, and
# nothing to act on in this example. Silenced here only, in the example; the library itself adds no warnings.
warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    pl.seed_everything(7)
    checkpoints = args.out / "checkpoints"
    trainer = pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=1, max_steps=args.max_steps,
                         callbacks=[ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=5, save_last=True)],
                         logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyRegression(total=40), train_dataloaders=make_dataloader(),
                ckpt_path="last" if args.resume else None)

    manifest = CheckpointManifest.load(checkpoints / "last.ckpt")
    print(f"global_step={trainer.global_step}; last.ckpt holds step {manifest.step}:")
    for key, component in manifest.components.items():
        print(f"  {key:<10} {component.sharing_pattern:<10} {component.size_bytes:>7} bytes, "
              f"{len(component.files)} files")


if __name__ == "__main__":
    main()
