"""Corruption: seeded random byte flips and truncations of every kind of file a checkpoint has.

tests/test_bad_input.py checks one hand-made flip or truncation per kind in a single process; here every
file of a real two-rank checkpoint (tests/scripts/fault_trials.py, ``corruption_suite``) is damaged at
random places (seeded): a replicated safetensors shard and its index, a tree's JSON, shard and index, a
GLOBAL JSON file, each rank's per-rank JSON, shard and index, and a per-rank flat component's merged
index. Each damaged copy is loaded by both ranks, which must refuse it with the same error naming the
component, the file and the rank that wrote it, and checked by ``lightning-sharing verify``.

The manifest has no checksum of its own; ``test_damaged_manifest_is_refused_or_harmless`` flips and
truncates it at random and requires a refusal naming the manifest (or the file or component it now
describes wrongly), or a load of exactly the saved state. The Lightning side (``ckpt_path`` at a damaged
newest checkpoint: an error by default, ``SharingStrategy(fallback=True)`` falls back loudly) is
tests/test_lightning_features.py::test_corrupt_last_checkpoint_is_an_error_unless_fallback_is_chosen.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from support.launch import ROOT, run

from lightning_sharing import CheckpointError, CheckpointManifest, ManifestError, find_latest_checkpoint
from lightning_sharing.cli import verify_checkpoint

sys.path.insert(0, str(ROOT / "tests" / "scripts"))
from fault_trials import make_coordinator, mismatches

SCRIPT = str(ROOT / "tests" / "scripts" / "fault_trials.py")
MERGED_INDEX = "stage.safetensors.index.json"  # written for HF readers; lightning_sharing reads the per-rank ones


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("corruption")
    run([SCRIPT, "corruption", "--seed", "0", "--out", str(work / "report.json"), "--workdir", str(work / "runs")],
        work / "corruption.log", timeout=300)
    return json.loads((work / "report.json").read_text())


def _kind(path: str) -> str:
    shape = re.sub(r"\d{5}", "N", path)
    return {"model-N-of-N.safetensors": "replicated shard", "model.safetensors.index.json": "replicated index",
            "optim-N-of-N.safetensors": "tree shard", "optim.safetensors.index.json": "tree index",
            "optim.json": "tree json", "counter.json": "global json", "rng/rank-N.json": "per-rank tree json",
            "rng/rank-N-N-of-N.safetensors": "per-rank shard", "rng/rank-N.safetensors.index.json": "per-rank index",
            "stage/rank-N-N-of-N.safetensors": "per-rank flat shard",
            "stage/rank-N.safetensors.index.json": "per-rank flat index",
            MERGED_INDEX: "merged index"}[shape]


def test_every_kind_of_file_of_both_ranks_was_damaged(suite) -> None:
    cases = suite["cases"].values()
    assert {_kind(c["file"]) for c in cases} == {
        "replicated shard", "replicated index", "tree shard", "tree index", "tree json", "global json",
        "per-rank tree json", "per-rank shard", "per-rank index", "per-rank flat shard", "per-rank flat index",
        "merged index"}
    assert {c["rank"] for c in cases} == {0, 1}
    assert {c["damage"].split()[0] for c in cases} == {"byte", "truncated"}


def test_every_damaged_file_is_refused_on_every_rank_naming_component_file_and_writer(suite) -> None:
    refused = 0
    for name, case in suite["cases"].items():
        if case["file"] == MERGED_INDEX:
            continue
        messages = set()
        for outcome in suite["outcomes"]:
            assert outcome["status"] == "ok", outcome["traceback"]
            result = outcome["result"][name]
            assert result["loaded"] is False, (name, case, result)
            assert "CorruptCheckpointError" in result["types"], (name, case, result)
            message = result["message"]
            assert f"component '{case['component']}', file {case['file']} (written by rank {case['rank']})" \
                in message, (case, message)
            # which rank failed to read it (PER_RANK files are read by their own rank only)
            assert re.search(r"failed on ranks? \[?\d", message), message
            assert ("checksum" in message) if case["damage"].startswith("byte") else ("truncated" in message)
            messages.add(message)
        assert len(messages) == 1, messages  # the same verdict on both ranks
        refused += 1
    assert refused >= 30


def test_verify_reports_every_damaged_file_with_component_and_rank(suite) -> None:
    for name, case in suite["cases"].items():
        problems = suite["verify"][name]
        assert [(p["component"], p["file"], p["rank"]) for p in problems] == [
            (case["component"], case["file"], case["rank"])], (case, problems)


def test_damaged_merged_index_is_not_used_by_load_and_verify_reports_it(suite) -> None:
    """The top-level merged index of a per-rank tensor component exists for Hugging Face readers; a load
    reads each rank's own index instead. Damage to it therefore cannot change what a load restores: the
    load must either refuse it (naming it) or restore exactly the saved state, and ``verify`` reports it."""
    cases = {n: c for n, c in suite["cases"].items() if c["file"] == MERGED_INDEX}
    assert len(cases) == 3
    for name in cases:
        for outcome in suite["outcomes"]:
            result = outcome["result"][name]
            if result["loaded"]:
                assert result["mismatch"] == [], result
            else:
                assert MERGED_INDEX in result["message"], result


# --------------------------------------------------------------------------- the manifest (single process)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "step=7.ckpt"
    coordinator, _ = make_coordinator(7, 0)
    coordinator.save_checkpoint(path, step=7)
    return path


def _damaged_copy(pristine: Path, where: Path, data: bytes) -> Path:
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(pristine, where)
    (where / "checkpoint_manifest.json").write_bytes(data)
    return where


def test_damaged_manifest_is_refused_or_harmless(pristine: Path, tmp_path: Path) -> None:
    original = (pristine / "checkpoint_manifest.json").read_bytes()
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    for trial in range(160):
        data = bytearray(original)
        if trial % 4 == 3:
            data = data[:rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        copy = _damaged_copy(pristine, tmp_path / "damaged.ckpt", bytes(data))
        coordinator, holders = make_coordinator(10**6, 0)
        try:
            coordinator.load_checkpoint(copy)
        except CheckpointError as exc:  # anything else (KeyError, TypeError, ...) fails the test
            message = str(exc)
            if isinstance(exc, ManifestError):
                assert "checkpoint_manifest.json" in message, message
            else:
                assert "component '" in message or "components [" in message, message
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        else:
            # A flip in whitespace or in a field loading does not use: exactly the saved state.
            assert mismatches(holders, 7, 0) == [], bytes(data)
            outcomes["harmless"] = outcomes.get("harmless", 0) + 1
        # One damaged checkpoint never breaks the search for the newest complete one.
        assert find_latest_checkpoint(tmp_path) in (None, copy)
    assert outcomes.get("DistributedManifestError", 0) > 100, outcomes


def test_manifest_with_an_overlong_integer_is_a_manifest_error(pristine: Path, tmp_path: Path) -> None:
    # Python refuses to convert integers of more than 4300 digits with a plain ValueError; one such
    # manifest must not crash find_latest_checkpoint for the whole directory.
    text = (pristine / "checkpoint_manifest.json").read_text()
    damaged = _damaged_copy(pristine, tmp_path / "step=9.ckpt", text.replace('"step": 7', '"step": ' + "9" * 5000)
                            .encode())
    shutil.copytree(pristine, tmp_path / "step=7.ckpt")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        CheckpointManifest.load(damaged)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step=7.ckpt"
    _, problems = verify_checkpoint(tmp_path / "step=7.ckpt")
    assert problems == []
