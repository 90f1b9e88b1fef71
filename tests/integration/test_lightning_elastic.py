"""Elastic resume with a Trainer: 2 ranks killed mid-epoch, resumed on 4, 1 and 3 (tests/scripts/lightning_elastic.py).

Checked for each resume: the ids seen in the interrupted epoch (the first run up to its checkpoint, then the resumed
run) are every id once, apart from the padding the new world size adds; each resumed step takes the next entries of
the epoch's global order; the next epoch is what an uninterrupted run at the new world size would see; the sum and
mean metrics over the interrupted epoch are those of exactly the ids seen (merged onto rank 0 from the saved ranks,
nothing lost, nothing counted twice). A PER_RANK component left at on_resize="error" refuses the resume.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from support.documented import documented, pattern
from support.launch import ROOT, run
from torch.utils.data import DistributedSampler

SCRIPT = ROOT / "tests" / "scripts" / "lightning_elastic.py"
SAMPLES, BATCH, SEED, EVERY = 45, 3, 11, 3


def _records(out: Path, name: str, world: int) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / f"{name}-w{world}-rank{rank}.jsonl").read_text().splitlines()]
            for rank in range(world)]


def _steps(records: list[dict], epoch: int) -> list[dict]:
    return [r for r in records if r.get("epoch") == epoch]


def _permutation(epoch: int) -> list[int]:
    generator = torch.Generator()
    generator.manual_seed(SEED + epoch)
    return torch.randperm(SAMPLES, generator=generator).tolist()


@pytest.fixture(scope="module", params=["plain", "workers"])
def first_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp(f"elastic-{request.param}")
    run([str(SCRIPT), "--out", str(out), "--phase", "first", "--loader", request.param], out / "first.log",
        timeout=240, expect=-9)
    return out, request.param


def _resume(first: Path, loader: str, world: int, *flags: str, expect: int = 0) -> tuple[Path, str]:
    out = first.parent / f"{first.name}-resumed-on-{world}{'-refuse' if flags else ''}"
    out.mkdir()
    shutil.copytree(first / "checkpoints", out / "checkpoints", symlinks=True)
    log = run([str(SCRIPT), "--out", str(out), "--phase", "resume", "--devices", str(world), "--loader", loader,
               *flags], out / "resume.log", timeout=300, expect=expect)
    return out, log


@pytest.mark.parametrize("world", [4, 1, 3])
def test_the_interrupted_epoch_continues_at_another_world_size(first_run: tuple[Path, str], world: int) -> None:
    first, loader = first_run
    if loader == "workers" and world != 4:
        pytest.skip("the StatefulDataLoader with workers is checked on 4 ranks (one launch)")
    out, _ = _resume(first, loader, world)
    before = [[r for r in _steps(records, 0) if r["step"] <= EVERY] for records in _records(first, "first", 2)]
    after = _records(out, "resume", world)
    epoch0 = [_steps(records, 0) for records in after]
    order = _permutation(0)
    consumed = EVERY * BATCH * 2
    # The first run took the start of the epoch's global order, rank r taking entries r, r + 2, ...
    taken = [None] * consumed
    for rank, steps in enumerate(before):
        for step, record in enumerate(steps):
            for j, sample in enumerate(record["ids"]):
                taken[(step * BATCH + j) * 2 + rank] = sample
    assert taken == order[:consumed]
    # Step by step the resumed ranks take the next entries of that order, padded for the new world size.
    rest = order[consumed:]
    padded = rest + order[:(-len(rest)) % world]
    assert [len(steps) for steps in epoch0] == [-(-len(padded) // world // BATCH)] * world
    for rank, steps in enumerate(epoch0):
        assert [sample for record in steps for sample in record["ids"]] == padded[rank::world]
        assert [record["step"] for record in steps] == list(range(EVERY + 1, EVERY + 1 + len(steps)))
    seen = Counter([s for steps in before for r in steps for s in r["ids"]] +
                   [s for steps in epoch0 for r in steps for s in r["ids"]])
    assert set(seen) == set(range(SAMPLES))
    assert sum(seen.values()) - SAMPLES == len(padded) - len(rest)  # only the new world size's padding repeats
    # The metrics over the epoch cover exactly what was seen (rank 0 merged the saved ranks' states).
    (end0,) = [r for r in after[0] if r.get("epoch_end") == 0]
    assert end0["sum"] == float(sum(sample * count for sample, count in seen.items()))
    assert end0["mean"] == pytest.approx(end0["sum"] / sum(seen.values()), rel=1e-6)
    # The next epoch is the uninterrupted run's at this world size.
    for rank, records in enumerate(after):
        sampler = DistributedSampler(range(SAMPLES), num_replicas=world, rank=rank, shuffle=True, seed=SEED)
        sampler.set_epoch(1)
        assert [s for r in _steps(records, 1) for s in r["ids"]] == list(sampler)


def test_a_component_left_at_error_refuses_the_resize(first_run: tuple[Path, str]) -> None:
    first, loader = first_run
    if loader != "plain":
        pytest.skip("checked once")
    _, log = _resume(first, loader, 1, "--refuse", expect=1)
    # The message docs/troubleshooting.md shows, word for word.
    message = pattern(documented("**Resuming PER_RANK state at another world size**"))
    assert message.search(" ".join(log.split())), log[-3000:]
