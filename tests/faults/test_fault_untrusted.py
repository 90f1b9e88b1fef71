"""Untrusted checkpoints: what tests/test_bad_input.py does not already refuse.

Already covered there (not repeated): a malicious pickle added to the directory, listed in the manifest,
or disguised under a listed shard / tree JSON / per-rank shard name; manifest paths with ``..`` or
absolute; symlinks inside the checkpoint (unlisted, replacing a listed file, replacing a directory).

Here: a pickle in place of the manifest or of a safetensors index, a pickle *file* given where a
checkpoint directory is expected (core, ``SharingCheckpointIO``, ``SharingStrategy``, Fabric), a manifest
that is a symlink, JSON files over the size limits (manifest, index, tree) and nested too deeply. Each is
refused with a clear message; the pickles would create a marker file when unpickled, and none appears.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from support.statefuls import Holder
from torch import nn

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointManifest,
    CorruptCheckpointError,
    DistributedCheckpointError,
    FabricSharingStrategy,
    ManifestError,
    SharingCheckpointIO,
    SharingStrategy,
    StateComponent,
    find_latest_checkpoint,
)
from lightning_sharing.checkpoint import manifest as manifest_module
from lightning_sharing.format import copy_files as payload_module
from lightning_sharing.format.safetensors_io import file_checksum

MANIFEST = "checkpoint_manifest.json"


class _Evil:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))



def _components(seed: int) -> list[StateComponent]:
    torch.manual_seed(seed)
    return [StateComponent("model", nn.Linear(3, 2), "replicated"),
            StateComponent("optim", Holder({"lr": 0.1 * seed, "avg": torch.randn(2)}), "replicated")]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "ckpts" / "step=1.ckpt"
    CheckpointCoordinator(_components(1)).save_checkpoint(path, step=1)
    assert sorted(p.name for p in path.iterdir()) == [
        MANIFEST, "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "optim-00001-of-00001.safetensors", "optim.json", "optim.safetensors.index.json"]
    return path


def _fix_up(path: Path, rel: str, checksum: bool = True) -> None:
    """Make the manifest agree with a replaced file (what an attacker who edits the manifest would do)."""
    data = json.loads((path / MANIFEST).read_text())
    for component in data["components"].values():
        for entry in component["files"]:
            if entry["path"] == rel:
                entry["size"] = (path / rel).stat().st_size
                entry["checksum"] = file_checksum(path / rel) if checksum else "xxh3_128:" + "0" * 32
    (path / MANIFEST).write_text(json.dumps(data))


def _refused(path: Path, error: type[CheckpointError], *words: str, verify: str = "checksum") -> str:
    with pytest.raises(error) as info:
        CheckpointCoordinator(_components(2)).load_checkpoint(path, verify=verify)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    return message


# --------------------------------------------------------------------------- pickles


def test_pickle_in_place_of_the_manifest_is_not_unpickled(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (saved / MANIFEST).write_bytes(pickle.dumps(_Evil(marker)))
    _refused(saved, ManifestError, f"{MANIFEST} is not valid JSON")
    assert find_latest_checkpoint(saved.parent) is None
    assert not marker.exists()


def test_pickle_in_place_of_a_safetensors_index_is_not_unpickled(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    (saved / "model.safetensors.index.json").write_bytes(pickle.dumps(_Evil(marker)))
    _fix_up(saved, "model.safetensors.index.json")
    _refused(saved, CorruptCheckpointError, "model.safetensors.index.json", "not valid JSON")
    assert not marker.exists()


def test_pickle_file_given_as_the_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "ckpts" / "step=9.ckpt"  # a file named like a checkpoint: an old torch.save file, or a trap
    evil.parent.mkdir()
    torch.save({"state_dict": _Evil(marker)}, evil)
    with pytest.raises(ManifestError, match="is not a checkpoint directory"):
        CheckpointCoordinator(_components(2)).load_checkpoint(evil)
    with pytest.raises(ManifestError, match="is not a checkpoint directory"):
        SharingCheckpointIO().load_checkpoint(evil)  # Lightning's rank-local read (e.g. the spawn launcher)
    # What Trainer.fit(ckpt_path=...) calls: a file is migrated from, read with torch.load(weights_only=True),
    # which refuses the pickle (fit(..., weights_only=False) is the user's choice for a file they trust).
    with pytest.raises(DistributedCheckpointError, match=r"reading the single-file checkpoint .* Weights only load"):
        SharingStrategy().load_checkpoint(evil)
    assert find_latest_checkpoint(evil.parent) is None
    # Fabric loads a plain file the way DDPStrategy does (fabric.load_raw): torch.load with weights_only,
    # which refuses the pickle unless the user passes weights_only=False for a file they trust.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        FabricSharingStrategy().load_checkpoint(evil, {"model": nn.Linear(3, 2)})
    assert not marker.exists()


# --------------------------------------------------------------------------- symlinks


def test_a_manifest_that_is_a_symlink_is_refused(saved: Path, tmp_path: Path) -> None:
    # The manifest elsewhere describes files that are all present: only the link itself is wrong.
    outside = tmp_path / "elsewhere.json"
    shutil.move(saved / MANIFEST, outside)
    os.symlink(outside, saved / MANIFEST)
    _refused(saved, ManifestError, MANIFEST, "is a symbolic link")
    assert find_latest_checkpoint(saved.parent) is None


# --------------------------------------------------------------------------- size and depth limits


def _sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)  # no disk space used, and never read by the code under test


def test_oversized_manifest_is_refused_without_reading_it(saved: Path) -> None:
    limit = manifest_module.MAX_MANIFEST_BYTES
    _sparse(saved / MANIFEST, limit + 1)
    _refused(saved, ManifestError, MANIFEST, f"is {limit + 1} bytes", f"over the {limit}-byte limit")
    assert find_latest_checkpoint(saved.parent) is None


@pytest.mark.parametrize(("rel", "what"), [
    ("model.safetensors.index.json", "safetensors index"),
    ("optim.json", "state structure"),
])
def test_oversized_index_or_tree_json_is_refused_without_reading_it(saved: Path, rel: str, what: str) -> None:
    # verify="size": the manifest only needs the size fixed up, and nothing reads the file's content.
    limit = payload_module._MAX_JSON_BYTES
    _sparse(saved / rel, limit + 1)
    _fix_up(saved, rel, checksum=False)
    _refused(saved, CorruptCheckpointError, what, rel, f"is {limit + 1} bytes, over the {limit}-byte limit",
             verify="size")


def test_deeply_nested_json_is_refused(saved: Path) -> None:
    (saved / "optim.json").write_text("[" * 200_000 + "]" * 200_000)
    _fix_up(saved, "optim.json")
    _refused(saved, CorruptCheckpointError, "optim.json", "not valid JSON")
    (saved / MANIFEST).write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ManifestError, match=r"nested too deeply|not valid JSON"):
        CheckpointManifest.load(saved)


def test_content_refusals_name_the_component_too(saved: Path) -> None:
    (saved / "optim.json").write_text('{"not": "a tree"}')
    _fix_up(saved, "optim.json")
    _refused(saved, CorruptCheckpointError, "optim.json", "component 'optim'")
