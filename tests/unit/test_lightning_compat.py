"""Lightning's private API as integration/compat.py uses it, on the shapes Lightning's own tests hand it."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sharing.integration.compat import checkpoint_dir


def test_checkpoint_dir_of_callbacks_with_and_without_a_directory(tmp_path: Path) -> None:
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    assert checkpoint_dir(ModelCheckpoint(dirpath=tmp_path / "ckpts"), trainer) == os.fspath(tmp_path / "ckpts")
    # No dirpath: the directory Lightning derives from the Trainer, as ModelCheckpoint's setup will.
    assert checkpoint_dir(ModelCheckpoint(), trainer) == os.fspath(tmp_path / "checkpoints")
    # A stand-in (Lightning's tests use mocks of ModelCheckpoint): no directory, and no crash.
    assert checkpoint_dir(mock.Mock(spec=ModelCheckpoint), trainer) is None
    assert checkpoint_dir(mock.MagicMock(), trainer) is None
