"""Incremental saves in one process: the option, the local store's guarded hard link, the shard groups, v1 sources.

The multi-rank behaviour (bytes per save, damaged sources, deletion, resume, S3, FSDP2) is in
tests/distributed/test_incremental.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.statefuls import Holder

from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
from lightning_sharing.checkpoint.manifest import FORMAT_VERSION, CheckpointManifest
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.errors import ComponentDeclarationError
from lightning_sharing.lightning.checkpoint_io import SharingCheckpointIO
from lightning_sharing.storage.local import LocalStore


def _origins(path: Path) -> dict[str, str]:
    return {f.path: (f.origin or {}).get("kind", "") for f in CheckpointManifest.load(path).all_files()}


def test_the_option_is_a_bool_and_reaches_every_entry_point() -> None:
    with pytest.raises(ComponentDeclarationError, match="incremental must be True or False, got 'yes'"):
        CheckpointOptions(incremental="yes")  # type: ignore[arg-type]
    assert CheckpointCoordinator([], incremental=True).options.incremental
    assert not CheckpointCoordinator([]).options.incremental
    assert SharingCheckpointIO(incremental=True).options.incremental


def test_local_reuse_links_only_a_file_that_is_what_was_recorded(tmp_path: Path) -> None:
    store, source = LocalStore(), tmp_path / "a"
    source.write_bytes(b"x" * 100)
    stamp = store.stamp(str(source))
    assert store.reuse_file(str(source), 100, stamp, str(tmp_path / "sub" / "b")) == stamp
    assert os.path.samefile(source, tmp_path / "sub" / "b")
    assert store.reuse_file(str(source), 99, stamp, str(tmp_path / "c")) is None  # another size
    assert store.reuse_file(str(source), 100, "1:2", str(tmp_path / "d")) is None  # another inode or mtime
    assert store.reuse_file(str(tmp_path / "gone"), 100, stamp, str(tmp_path / "e")) is None
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_unchanged_tensors_of_a_plain_stateful_get_files_of_their_own_then_are_linked(tmp_path: Path) -> None:
    """A stateful that is no module: its unchanged tensors move to the ``stable`` group at the second save (written
    there once) and are linked from the third on; the changing one is written every time."""
    state = {"fixed": torch.arange(1000.0), "moving": torch.zeros(10)}
    coordinator = CheckpointCoordinator([StateComponent("s", Holder(state), SharingPattern.GLOBAL)],
                                        incremental=True)
    for step in (1, 2, 3):
        state["moving"].add_(1)
        coordinator.save_checkpoint(tmp_path / f"step={step}.ckpt", step=step)
    assert _origins(tmp_path / "step=1.ckpt")["s-00001-of-00001.safetensors"] == "written"
    assert _origins(tmp_path / "step=2.ckpt")["s-stable-00001-of-00001.safetensors"] == "written"
    third = _origins(tmp_path / "step=3.ckpt")
    assert third["s-stable-00001-of-00001.safetensors"] == "linked"
    assert third["s-00001-of-00001.safetensors"] == "written"
    loaded = Holder({"fixed": torch.zeros(1000), "moving": torch.zeros(10)})
    CheckpointCoordinator([StateComponent("s", loaded, SharingPattern.GLOBAL)]).load_checkpoint(
        tmp_path / "step=3.ckpt")
    assert torch.equal(loaded.state_dict()["fixed"], state["fixed"])
    assert torch.equal(loaded.state_dict()["moving"], state["moving"])


def test_a_plain_save_records_stamps_and_a_version_1_checkpoint_is_never_a_source(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    model.requires_grad_(False)
    CheckpointCoordinator([StateComponent("m", model, SharingPattern.GLOBAL)]).save_checkpoint(tmp_path / "step=1.ckpt")
    manifest = CheckpointManifest.load(tmp_path / "step=1.ckpt")
    assert manifest.format_version == FORMAT_VERSION == 2
    assert all(f.stamp and f.origin == {"kind": "written"} for f in manifest.all_files())
    incremental = CheckpointCoordinator([StateComponent("m", model, SharingPattern.GLOBAL)], incremental=True)
    incremental.save_checkpoint(tmp_path / "step=2.ckpt")  # the first incremental save: frozen group, written
    incremental.save_checkpoint(tmp_path / "step=3.ckpt")
    assert _origins(tmp_path / "step=3.ckpt")["m-frozen-00001-of-00001.safetensors"] == "linked"
    raw = (tmp_path / "step=3.ckpt" / "checkpoint_manifest.json").read_text()  # make it a version-1 manifest
    data = CheckpointManifest.parse(raw.encode(), "m").to_json()
    data["format_version"] = 1
    for component in data["components"].values():
        for entry in component["files"]:
            entry.pop("stamp"), entry.pop("origin")
    (tmp_path / "step=3.ckpt" / "checkpoint_manifest.json").write_text(json.dumps(data))
    incremental.save_checkpoint(tmp_path / "step=4.ckpt")
    assert _origins(tmp_path / "step=4.ckpt")["m-frozen-00001-of-00001.safetensors"] == "written"


def test_a_frozen_tensor_changed_through_data_is_written_afresh(tmp_path: Path) -> None:
    """``p.data.mul_()`` (an EMA updated the old way) does not move ``p``'s version counter: the fingerprint says
    unchanged, the content's checksum does not, and the file is written again with the new values."""
    model = torch.nn.Linear(64, 64)
    model.requires_grad_(False)
    coordinator = CheckpointCoordinator([StateComponent("m", model, SharingPattern.GLOBAL)], incremental=True)
    coordinator.save_checkpoint(tmp_path / "step=1.ckpt")
    version = model.weight._version
    model.weight.data.mul_(0.5)
    assert model.weight._version == version  # what the fingerprint cannot see
    coordinator.save_checkpoint(tmp_path / "step=2.ckpt")
    assert _origins(tmp_path / "step=2.ckpt")["m-frozen-00001-of-00001.safetensors"] == "written"
    coordinator.save_checkpoint(tmp_path / "step=3.ckpt")  # unchanged since: linked again
    assert _origins(tmp_path / "step=3.ckpt")["m-frozen-00001-of-00001.safetensors"] == "linked"
    loaded = torch.nn.Linear(64, 64)
    CheckpointCoordinator([StateComponent("m", loaded, SharingPattern.GLOBAL)]).load_checkpoint(
        tmp_path / "step=3.ckpt")
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)


def test_files_whose_tensors_changed_are_not_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Full fine-tuning: every fingerprint moved, so no file is worth hashing; an unchanged file is hashed once."""
    import lightning_sharing.engine.copy_format as copy_format

    hashed: list[int] = []
    original = copy_format.tensors_checksum
    monkeypatch.setattr(copy_format, "tensors_checksum", lambda tensors: hashed.append(1) or original(tensors))
    model = torch.nn.Linear(64, 64)
    coordinator = CheckpointCoordinator([StateComponent("m", model, SharingPattern.GLOBAL)], incremental=True)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1)
            model.bias.add_(1)
        coordinator.save_checkpoint(tmp_path / f"step={step}.ckpt")
    assert hashed == []
    coordinator.save_checkpoint(tmp_path / "step=4.ckpt")  # unchanged since step 3: moved to the stable group
    coordinator.save_checkpoint(tmp_path / "step=5.ckpt")  # and from there, hashed once and linked
    assert len(hashed) == 1 and _origins(tmp_path / "step=5.ckpt")["m-stable-00001-of-00001.safetensors"] == "linked"
