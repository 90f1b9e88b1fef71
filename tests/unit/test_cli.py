"""The lightning-sharing command line: verify (exit 0 / 1 / 2) and inspect."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lightning_sharing import CheckpointCoordinator, RNGState, SharingPattern, StateComponent
from lightning_sharing.cli import main
from lightning_sharing.format.safetensors_io import file_checksum


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "step=7.ckpt"
    CheckpointCoordinator([
        StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True),
        StateComponent("optimizer", optimizer, SharingPattern.REPLICATED),
        StateComponent("rng", RNGState(), SharingPattern.PER_RANK),
    ]).save_checkpoint(path, step=7)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, " ".join(capsys.readouterr().out.split())  # rich wraps lines: compare on single spaces


def test_verify_intact_checkpoint(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "verify", str(checkpoint))
    assert code == 0
    assert "OK:" in out and "3 components" in out and "sizes and checksums match the manifest" in out


def test_verify_reports_flipped_byte_with_component_file_and_rank(checkpoint: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shard = checkpoint / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    (checkpoint / "optimizer.json").write_bytes((checkpoint / "optimizer.json").read_bytes()[:-10])

    code, out = _run(capsys, "verify", str(checkpoint))
    assert code == 1
    assert "2 problem(s)" in out and "FAILED" in out
    assert "model-00001-of-00001.safetensors" in out and "checksum" in out
    assert "optimizer.json" in out and "truncated" in out
    # Size-only checking misses the flipped byte but still sees the truncation.
    code, out = _run(capsys, "verify", "--size-only", str(checkpoint))
    assert code == 1 and "1 problem(s)" in out and "optimizer.json" in out


def test_verify_reports_unlisted_files_and_index_pointing_elsewhere(checkpoint: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (checkpoint / "notes.pt").write_bytes(b"\x80\x04not a checkpoint file")
    code, out = _run(capsys, "verify", str(checkpoint))
    assert code == 1 and "notes.pt" in out and "does not list" in out
    (checkpoint / "notes.pt").unlink()

    # An index rewritten to name a shard that is not there, with the manifest "fixed up" to match it.
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {name: "model-00002-of-00002.safetensors" for name in index["weight_map"]}
    index_path.write_text(json.dumps(index))
    manifest_path = checkpoint / "checkpoint_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["components"]["model"]["files"]:
        if entry["path"] == index_path.name:
            entry["size"], entry["checksum"] = index_path.stat().st_size, file_checksum(index_path)
    manifest_path.write_text(json.dumps(manifest))
    code, out = _run(capsys, "verify", str(checkpoint))
    assert code == 1 and "1 problem(s)" in out
    assert "the index points to shards the manifest does not list" in out and "model-00002-of-00002" in out


def test_verify_and_inspect_refuse_a_directory_without_manifest(checkpoint: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (checkpoint / "checkpoint_manifest.json").unlink()
    for command in ("verify", "inspect"):
        code, out = _run(capsys, command, str(checkpoint))
        assert code == 2 and "ERROR:" in out and "checkpoint_manifest.json is missing" in out


def test_inspect_prints_components_patterns_writers_and_sizes(checkpoint: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((checkpoint / "checkpoint_manifest.json").read_text())
    code, out = _run(capsys, "inspect", "--files", str(checkpoint))
    assert code == 0
    assert "step 7, world size 1" in out
    for key, pattern in (("model", "REPLICATED"), ("optimizer", "REPLICATED"), ("rng", "PER_RANK")):
        assert f"│ {key} " in out and pattern in out
    for entry in manifest["components"]["rng"]["files"]:
        assert entry["path"] in out and entry["checksum"] in out


def test_console_script_is_installed(checkpoint: Path) -> None:
    script = shutil.which("lightning-sharing", path=str(Path(__import__("sys").executable).parent))
    assert script is not None, "pip install should create the lightning-sharing console script"
    result = subprocess.run([script, "verify", str(checkpoint)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
