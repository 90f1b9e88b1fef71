"""A save never commits a checkpoint a load would refuse: the size limits on JSON files and on the manifest.

The scale simulation found a 70B job whose optimizer chunk index (279 MiB at 1,024 ranks) saved and was then refused
at load by the 256 MiB JSON limit. Now the save refuses it first, naming the limit and how to raise it, and the
limit can be raised (``LIGHTNING_SHARING_MAX_JSON_BYTES``) for the saving and the loading job alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.statefuls import Holder

from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
from lightning_sharing.engine import save as save_module
from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.format.copy_files import MAX_JSON_ENV


def _coordinator(holder: Holder) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("state", holder, SharingPattern.GLOBAL)])


def _holder() -> Holder:
    # Many small entries: the structure JSON is a few kB, the tensors a few bytes.
    return Holder({f"entry_{i:03d}": {"count": i, "w": torch.full((2,), float(i))} for i in range(64)})


def test_a_save_whose_json_a_load_would_refuse_is_refused_and_nothing_is_committed(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    monkeypatch.setenv(MAX_JSON_ENV, "512")
    with pytest.raises(CheckpointError, match=r"could be saved but not loaded.*LIGHTNING_SHARING_MAX_JSON_BYTES"):
        _coordinator(_holder()).save_checkpoint(tmp_path / "too-big.ckpt", step=1)
    assert list(tmp_path.iterdir()) == []  # nothing committed, nothing left staged


def test_the_limit_applies_at_load_and_can_be_raised(tmp_path: Path, monkeypatch) -> None:
    saved = _holder()
    _coordinator(saved).save_checkpoint(tmp_path / "ok.ckpt", step=1)  # the default limit: saved
    monkeypatch.setenv(MAX_JSON_ENV, "512")
    with pytest.raises(CorruptCheckpointError, match=r"over the 512-byte limit.*LIGHTNING_SHARING_MAX_JSON_BYTES"):
        _coordinator(Holder()).load_checkpoint(tmp_path / "ok.ckpt")
    monkeypatch.setenv(MAX_JSON_ENV, str(1 << 20))
    loaded = Holder()
    _coordinator(loaded).load_checkpoint(tmp_path / "ok.ckpt")
    assert loaded.state.keys() == saved.state.keys()
    assert all(torch.equal(loaded.state[k]["w"], saved.state[k]["w"]) for k in saved.state)


@pytest.mark.parametrize("value", ["many", "0", "-5"])
def test_a_bad_limit_is_named(tmp_path: Path, monkeypatch, value: str) -> None:
    monkeypatch.setenv(MAX_JSON_ENV, value)
    with pytest.raises(CheckpointError, match=MAX_JSON_ENV):
        _coordinator(_holder()).save_checkpoint(tmp_path / "x.ckpt", step=1)


def test_a_manifest_a_load_would_refuse_is_not_committed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(save_module, "MAX_MANIFEST_BYTES", 4096)
    with pytest.raises(CheckpointError, match=r"the manifest would be \d+ bytes, over the 4096-byte limit"):
        _coordinator(_holder()).save_checkpoint(tmp_path / "meta.ckpt", step=1, metadata={"notes": "x" * 8192})
    assert list(tmp_path.iterdir()) == []
