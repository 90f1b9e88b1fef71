"""Lightning's restore habits with SharingStrategy (2 processes), driven by tests/integration/test_lightning_restore.py.

In the manner of Lightning's own tests_pytorch/models/test_restore.py: train, checkpoint, load back, compare. One
job on both ranks:

1. fit ``Model`` (``save_hyperparameters()``) with a datamodule that saves its own hyper-parameters and state,
   ModelCheckpoint(monitor="val_loss", save_top_k=-1, save_last=True); then ``trainer.test`` on the fitted model;
2. a new Trainer: ``test``/``validate``/``predict(Model(), ckpt_path=best)`` on models that were never fitted;
3. ``strategy.connect(model)`` on a module no Trainer ever saw, then Lightning's own restore calls;
4. ``fit(ckpt_path=<missing>)``: the error type and text;
5. fit ``ConfModel`` (OmegaConf ``DictConfig`` hyper-parameters: Lightning saves ``hparams_type``).

Each rank writes OUT/result-rank{r}.json; the test then loads the directories in its own process with
``Model.load_from_checkpoint`` / ``DataModule.load_from_checkpoint``. The classes live here so the test imports them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_sharing import SharingStrategy


def dataset(n: int = 32, seed: int = 0) -> torch.utils.data.TensorDataset:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


class _Net(pl.LightningModule):
    """Its layers are declared out of alphabetical order: state-dict keys must come back in this order."""

    def build(self, width: int) -> None:
        self.z_in = nn.Linear(4, width)
        self.a_out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_out(torch.tanh(self.z_in(x)))

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Model(_Net):
    def __init__(self, width: int = 8, lr: float = 0.05, tag: str = "trained") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.build(width)


class DataModule(pl.LightningDataModule):
    """Saves its hyper-parameters and a state of its own (``state_dict``), as Lightning datamodules may."""

    def __init__(self, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.loads = 0

    def state_dict(self) -> dict[str, Any]:
        return {"loads": self.loads + 1}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loads = int(state["loads"])

    def _loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset(seed=self.hparams.seed), batch_size=self.hparams.batch_size)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


class ConfModel(_Net):
    """Hyper-parameters given as one OmegaConf config (Lightning stores ``hparams_type`` for it)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.save_hyperparameters(cfg)
        self.build(cfg.width)


def trainer(**kwargs: Any) -> pl.Trainer:
    return pl.Trainer(strategy=SharingStrategy(), accelerator="cpu", devices=2, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def weights(module: nn.Module) -> dict[str, list[float]]:
    return {k: v.flatten().tolist() for k, v in module.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pl.seed_everything(11)
    out: Path = args.out
    result: dict[str, Any] = {}

    # 1. train, checkpoint, test the fitted model
    callback = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val_loss", save_top_k=-1, save_last=True)
    t = trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, callbacks=[callback])
    model = Model(width=6, lr=0.1)
    t.fit(model, datamodule=DataModule(batch_size=4, seed=3))
    t.save_checkpoint(out / "final.ckpt")
    result.update(best=callback.best_model_path, last=callback.last_model_path, final_weights=weights(model),
                  final_keys=list(model.state_dict()))
    result["test_fitted"] = t.test(model, datamodule=DataModule(seed=3), ckpt_path=None, verbose=False)[0]
    result["predict_fitted"] = torch.cat(t.predict(model, datamodule=DataModule(seed=3))).flatten().tolist()

    # 2. a new Trainer and never-fitted models, with the weights from the final checkpoint directory
    final = str(out / "final.ckpt")
    t2 = trainer()
    result["test_new"] = t2.test(Model(width=6), datamodule=DataModule(seed=3), ckpt_path=final, verbose=False)[0]
    result["validate_new"] = t2.validate(Model(width=6), datamodule=DataModule(seed=3), ckpt_path=final,
                                         verbose=False)[0]
    predicted = t2.predict(Model(width=6), datamodule=DataModule(seed=3), ckpt_path=final)
    result["predict_new"] = torch.cat(predicted).flatten().tolist()

    # 3. strategy.connect(model) then restore: the module is attached to no Trainer
    t3 = trainer()
    fresh = Model(width=6)
    t3.strategy.connect(fresh)
    t3._checkpoint_connector.resume_start(final)
    t3._checkpoint_connector.restore_model()
    result["connected_weights"] = weights(fresh)

    # 4. a checkpoint that does not exist
    try:
        trainer(max_epochs=1).fit(Model(width=6), datamodule=DataModule(), ckpt_path=out / "missing.ckpt")
        result["missing"] = None
    except Exception as exc:  # the test checks the type and the text
        result["missing"] = {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}

    # 5. OmegaConf hyper-parameters
    from omegaconf import OmegaConf

    conf = ConfModel(OmegaConf.create({"width": 5, "lr": 0.1, "tag": "conf", "layers": [1, 2]}))
    t5 = trainer(max_steps=2, limit_val_batches=0)
    t5.fit(conf, datamodule=DataModule())
    t5.save_checkpoint(out / "conf.ckpt")
    result["conf_weights"] = weights(conf)
    (out / f"result-rank{t.global_rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
