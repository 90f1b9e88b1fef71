"""The lightning-sharing command line: verify (exit 0 / 1 / 2) and inspect."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_sharing
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


@pytest.fixture
def sharded_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2))
    path = tmp_path / "step=3.ckpt"
    CheckpointCoordinator([StateComponent("model", model, SharingPattern.SHARDED)]).save_checkpoint(path, step=3)
    return path


def test_verify_and_inspect_a_sharded_checkpoint(sharded_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, "verify", str(sharded_checkpoint))
    assert code == 0 and "1 components, 3 files" in out
    code, out = _run(capsys, "inspect", str(sharded_checkpoint))
    assert code == 0 and "SHARDED" in out and "model: 4 tensors in 4 chunks" in out
    assert "│ 0 │ 4 │ 4 │ 184 B │ model/chunks-00000.safetensors │" in out
    # A flipped byte in the chunk file fails its whole-file checksum, as for any other file.
    chunks = sharded_checkpoint / "model" / "chunks-00000.safetensors"
    data = bytearray(chunks.read_bytes())
    data[-2] ^= 0x10
    chunks.write_bytes(bytes(data))
    code, out = _run(capsys, "verify", str(sharded_checkpoint))
    assert code == 1 and "model/chunks-00000.safetensors" in out and "checksum" in out


def test_verify_finds_a_chunk_index_that_disagrees_with_the_manifest(sharded_checkpoint: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    index_path = sharded_checkpoint / "model" / "index.json"
    index = json.loads(index_path.read_text())
    index["files"][0]["size"] += 1
    index_path.write_text(json.dumps(index))
    manifest_path = sharded_checkpoint / "checkpoint_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["components"]["model"]["files"]:
        if entry["path"] == "model/index.json":
            entry["size"], entry["checksum"] = index_path.stat().st_size, file_checksum(index_path)
    manifest_path.write_text(json.dumps(manifest))
    code, out = _run(capsys, "verify", str(sharded_checkpoint))
    assert code == 1 and "the chunk index and the manifest disagree on chunk files ['model/chunks-00000" in out


def test_export_options_are_checked(sharded_checkpoint: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_sharing.engine.export import parse_size

    assert [parse_size(v) for v in ("5GB", "500MB", "2GiB", "1.5KB", 77)] == [5 * 10**9, 5 * 10**8, 2 * 2**30, 1500,
                                                                               77]
    code, out = _run(capsys, "export", str(sharded_checkpoint), str(tmp_path / "a"), "--dtype", "int8")
    assert code == 1 and "dtype='int8' is not a floating-point torch dtype" in out
    code, out = _run(capsys, "export", str(sharded_checkpoint), str(tmp_path / "a"), "--max-shard-size", "lots")
    assert code == 1 and "max_shard_size='lots' is not a size" in out
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "mine.txt").write_text("keep")
    code, out = _run(capsys, "export", str(sharded_checkpoint), str(tmp_path / "occupied"))
    assert code == 1 and "it exists and is not an earlier export" in out
    assert (tmp_path / "occupied" / "mine.txt").read_text() == "keep"
    # An earlier export is replaced.
    assert _run(capsys, "export", str(sharded_checkpoint), str(tmp_path / "hf"))[0] == 0
    assert _run(capsys, "export", str(sharded_checkpoint), str(tmp_path / "hf"), "--max-shard-size", "40")[0] == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir())[-1] == "model.safetensors.index.json"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("pattern", [SharingPattern.SHARDED, SharingPattern.REPLICATED])
def test_tied_weights_stored_once_loaded_tied_and_exported_once(pattern, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = _Tied()
    path = tmp_path / "step=1.ckpt"
    CheckpointCoordinator([StateComponent("model", model, pattern)]).save_checkpoint(path, step=1)
    fresh = _Tied()
    CheckpointCoordinator([StateComponent("model", fresh, pattern)]).load_checkpoint(path)
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight
    assert _run(capsys, "export", str(path), str(tmp_path / "hf"))[0] == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == ["embed.weight"]
    assert index["metadata"]["tied"] == {"head.weight": "embed.weight"}
    assert index["metadata"]["total_size"] == 6 * 4 * 4
    exported = load_file(tmp_path / "hf" / index["weight_map"]["embed.weight"])
    assert list(exported) == ["embed.weight"] and torch.equal(exported["embed.weight"], model.embed.weight)


def test_json_output_for_scripts(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", "--json", str(checkpoint)]) == 0
    verdict = json.loads(capsys.readouterr().out)
    saved = json.loads((checkpoint / "checkpoint_manifest.json").read_text())
    files = [entry for component in saved["components"].values() for entry in component["files"]]
    assert verdict == {"path": str(checkpoint), "ok": True, "checked": "checksum", "components": 3,
                       "files": len(files), "bytes": sum(entry["size"] for entry in files), "problems": []}
    with open(checkpoint / "optimizer.json", "ab") as handle:
        handle.write(b" ")
    assert main(["verify", "--json", str(checkpoint)]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert not verdict["ok"] and [(p["component"], p["file"], p["rank"]) for p in verdict["problems"]] == [
        ("optimizer", "optimizer.json", 0)]
    assert "truncated" in verdict["problems"][0]["message"]
    assert main(["inspect", "--json", str(checkpoint)]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["manifest"] == saved and described["chunks_by_rank"] == {}
    assert main(["verify", "--json", str(checkpoint / "missing")]) == 2
    failure = json.loads(capsys.readouterr().out)
    assert failure["ok"] is False and "does not exist" in failure["error"]


def test_json_inspect_counts_chunks_per_rank(sharded_checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(sharded_checkpoint)]) == 0
    chunks = json.loads(capsys.readouterr().out)["chunks_by_rank"]
    assert chunks == {"model": {"0": {"tensors": 4, "chunks": 4, "bytes": 184,
                                      "file": "model/chunks-00000.safetensors"}}}


def test_help_and_version_import_no_torch() -> None:
    # --help and --version answer before anything heavy is imported: no torch, no Lightning.
    code = ("import sys\nfrom lightning_sharing.cli import main\n"
            "for argv in (['--help'], ['--version'], ['verify', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0, exc.code\n"
            "print(sorted(m for m in ('torch', 'lightning', 'rich') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
    assert f"lightning-sharing {lightning_sharing.__version__}" in result.stdout


def test_progress_bar_only_on_a_terminal(checkpoint: Path) -> None:
    # Piped: no progress bar characters, just the verdict. On a terminal (rich forced to think so): a bar.
    piped = subprocess.run([sys.executable, "-m", "lightning_sharing.cli", "verify", str(checkpoint)],
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stdout.startswith("OK:") and "verifying" not in piped.stdout
    env = {**os.environ, "FORCE_COLOR": "1", "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "100"}
    forced = subprocess.run([sys.executable, "-m", "lightning_sharing.cli", "verify", str(checkpoint)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert forced.returncode == 0 and "verifying" in forced.stdout and "OK:" in forced.stdout
    for output, environment in ((checkpoint.parent / "piped", None), (checkpoint.parent / "forced", env)):
        exported = subprocess.run([sys.executable, "-m", "lightning_sharing.cli", "export", str(checkpoint),
                                   str(output)], capture_output=True, text=True, timeout=60, env=environment)
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", exported.stdout)  # a terminal's output is coloured
        assert exported.returncode == 0 and "exported component 'model'" in plain
        assert ("exporting" in exported.stdout) == (environment is not None)
