"""Fuzz the manifest parser: whatever the bytes or JSON, it either parses or raises ManifestError, nothing else."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointManifest,
    ManifestError,
    RNGState,
    SharingPattern,
    StateComponent,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _valid_manifest(tmp: Path) -> dict:
    model = torch.nn.Linear(2, 2)
    path = tmp / "valid.ckpt"
    if not path.exists():
        CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED),
                               StateComponent("rng", RNGState(), SharingPattern.PER_RANK)]).save_checkpoint(path)
    return json.loads((path / "checkpoint_manifest.json").read_text())


def _parse(data: object) -> None:
    try:
        CheckpointManifest.from_json(data)
    except ManifestError:
        pass


def _parse_bytes(raw: bytes) -> None:
    try:
        CheckpointManifest.parse(raw, "fuzzed manifest")
    except ManifestError as exc:
        assert "fuzzed manifest" in str(exc), exc  # the refusal names the file


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_raises_only_manifest_error(data: object) -> None:
    _parse(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_real_manifest_raises_only_manifest_error(tmp_path: Path, data: st.DataObject) -> None:
    manifest = copy.deepcopy(_valid_manifest(tmp_path))
    # Replace one value somewhere in a real manifest with arbitrary JSON.
    node, path = manifest, []
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    if path:
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = data.draw(json_values)
    _parse(manifest)


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifest_bytes_raise_only_manifest_error(tmp_path: Path, data: st.DataObject) -> None:
    original = json.dumps(_valid_manifest(tmp_path), indent=2).encode()
    where = data.draw(st.integers(0, len(original)))
    junk = data.draw(st.binary(max_size=16) | st.sampled_from([b"1" * 5000, b"[" * 100000, b"\xff\xfe", b"NaN"]))
    cut = data.draw(st.integers(0, 16))
    _parse_bytes(original[:where] + junk + original[where + cut:])
