"""The scale simulation (benchmarks/scale_sim.py) at 8 and 64 ranks on tiny Llama-like models: its structural claims.

What a rank other than 0 receives per save does not depend on the world size; what rank 0 receives and the manifest
grow about linearly; the files written are the rule table's (every rank's chunk file of a SHARDED component, one
copy per rank of PER_RANK state, GLOBAL state once); read-once reads a replicated model once. No timing is asserted.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _scale_state import Job, ModelShape
from scale_sim import simulate

from lightning_sharing.core.rules import ChunkFiles, file_regex, placements
from lightning_sharing.core.topology import Topology

TINY = ModelShape("tiny", layers=2, hidden=64, intermediate=128, kv_hidden=16, vocab=256)
JOBS = {"fsdp_tp": Job(TINY, "fsdp_tp"), "ddp": Job(TINY, "ddp")}
WORLDS = (8, 64)
KEYS = ("model", "optimizer", "rng", "trainer")


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], dict[str, Any]]:
    root = str(tmp_path_factory.mktemp("scale"))
    return {(name, world): simulate(job, world, root) for name, job in JOBS.items() for world in WORLDS}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_what_a_rank_other_than_0_receives_does_not_grow_with_the_world(rows, name: str) -> None:
    small, large = rows[name, WORLDS[0]], rows[name, WORLDS[-1]]
    assert small["received_rank"] == large["received_rank"]
    assert small["ballot_bytes"] == large["ballot_bytes"]
    assert abs(large["sent_rank"] - small["sent_rank"]) <= 0.1 * small["sent_rank"]
    growth = (WORLDS[-1] - 1) / (WORLDS[0] - 1)  # rank 0 hears N - 1 reports of about the same size
    assert 0.7 * growth <= large["received_rank0"] / small["received_rank0"] <= 1.3 * growth


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_manifest_grows_about_linearly(rows, name: str) -> None:
    small, large = rows[name, WORLDS[0]], rows[name, WORLDS[-1]]
    assert small["manifest_bytes"] < large["manifest_bytes"] <= 1.2 * (WORLDS[-1] / WORLDS[0]) * small["manifest_bytes"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_files_written_are_the_rule_tables(rows, name: str, world: int) -> None:
    row = rows[name, world]
    paths = row["paths"]
    assert row["files_written"] == len(paths) + 1  # and the manifest
    by_key = {key: [p for p in paths if re.fullmatch(file_regex(key), p)] for key in KEYS}
    assert sorted(p for found in by_key.values() for p in found) == paths  # each file is one component's
    topology = Topology.build(world, node_of_rank=[r // 8 for r in range(world)])
    per_rank = {p.stem for p in placements("rng", "per_rank", topology)}
    stems = {re.match(r"rng/rank-\d{5}", p)[0] for p in by_key["rng"]}  # type: ignore[index]
    assert stems == per_rank  # one copy per rank, under its stem
    assert all(p.startswith("trainer") and "/" not in p for p in by_key["trainer"])  # GLOBAL: one copy
    if name == "fsdp_tp":  # every rank holds pieces of every projection: every rank writes its chunk file
        for key in ("model", "optimizer"):
            chunk_files = {p for p in by_key[key] if p.endswith(".safetensors")}
            assert chunk_files == {ChunkFiles().file_for(key, r) for r in range(world)}
            assert ChunkFiles().index_for(key) in by_key[key]


def test_read_once_reads_a_replicated_model_once(rows) -> None:
    row = rows["ddp", WORLDS[-1]]  # every rank reads the whole model; once, with read-once (RNG state: per rank)
    assert row["load_read_bytes"] >= 10 * row["load_read_bytes_once"]
    sharded = rows["fsdp_tp", WORLDS[-1]]
    assert sharded["load_read_bytes_once"] <= sharded["load_read_bytes"]
