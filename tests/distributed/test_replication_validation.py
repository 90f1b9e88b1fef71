"""REPLICATED state is compared across ranks at QUICK, TENSOR and FULL; every rank reaches the same verdict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.dist_harness import run_distributed

LEVELS = ["quick", "tensor", "full"]


def _trained_adamw(dtype: torch.dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 8, dtype=dtype)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _validation_worker(rank: int, world_size: int, root: str, case: str):
    from lightning_sharing import CheckpointCoordinator, ReplicationMismatchError, SharingPattern, StateComponent

    verdicts = {}
    for level in LEVELS:
        dtype = torch.bfloat16 if case == "bf16-element" else torch.float32
        model, optimizer = _trained_adamw(dtype)
        if rank == 2 and case == "adam-state":
            # One element of one nested optimizer tensor diverges on rank 2 (on the first of 64
            # sampled positions, so QUICK sees it too).
            optimizer.state[optimizer.param_groups[0]["params"][2]]["exp_avg"].view(-1)[0] += 1e-3
        if rank == 2 and case == "bf16-element":
            with torch.no_grad():
                model[2].bias[1] = model[2].bias[1] + 1
        if rank == 1 and case == "lr":
            optimizer.param_groups[0]["lr"] = 0.5
        components = [
            StateComponent("model", model, SharingPattern.REPLICATED, validate_replication=True,
                           validation_level=level),
            StateComponent("optimizer", optimizer, SharingPattern.REPLICATED, validate_replication=True,
                           validation_level=level),
        ]
        try:
            CheckpointCoordinator(components).save_checkpoint(Path(root) / f"{case}-{level}.ckpt")
            verdicts[level] = None
        except ReplicationMismatchError as exc:
            verdicts[level] = str(exc)
    return verdicts


def test_identical_state_passes_every_level(tmp_path: Path) -> None:
    results = run_distributed(_validation_worker, 3, str(tmp_path), "identical")
    assert all(v == {level: None for level in LEVELS} for v in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"identical-{lv}.ckpt" for lv in sorted(LEVELS)]


@pytest.mark.parametrize(
    ("case", "component", "path", "ranks"),
    [
        ("adam-state", "optimizer", "state.2.exp_avg", "[2]"),
        ("bf16-element", "model", "2.bias", "[2]"),
        ("lr", "optimizer", "<structure", "[1]"),
    ],
)
def test_divergence_is_named_on_every_rank(tmp_path: Path, case: str, component: str, path: str, ranks: str) -> None:
    results = run_distributed(_validation_worker, 3, str(tmp_path), case)
    for level in LEVELS:
        messages = {res[level] for res in results}
        assert len(messages) == 1, f"ranks disagree at {level}: {messages}"
        (message,) = messages
        assert message is not None, f"{case} not detected at {level}"
        assert f"REPLICATED component '{component}' differs" in message
        assert f"ranks {ranks} differ from rank 0" in message
        assert path in message
    assert list(tmp_path.iterdir()) == []  # nothing committed, no staging left behind


def _exempt_worker(rank: int, world_size: int, root: str):
    from lightning_sharing import CheckpointCoordinator, ReplicationMismatchError, SharingPattern, StateComponent
    from lightning_sharing.statefuls.holders import ValueHolder

    outcomes = []
    for differing in ("running_mean", "weight"):
        state = {"weight": torch.ones(3), "running_mean": torch.zeros(3)}
        state[differing] = state[differing] + rank  # rank 1 differs in one entry
        holder = ValueHolder(state, exempt=frozenset({"running_mean"}))
        component = StateComponent("model", holder, SharingPattern.REPLICATED, validate_replication=True,
                                   validation_level="tensor")
        try:
            CheckpointCoordinator([component]).save_checkpoint(Path(root) / f"{differing}.ckpt")
            outcomes.append(None)
        except ReplicationMismatchError as exc:
            outcomes.append(str(exc))
    return outcomes


def test_replicated_view_exempts_entries_from_the_check_but_saves_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    results = run_distributed(_exempt_worker, 2, str(tmp_path))
    for exempt_ok, weight_error in results:
        assert exempt_ok is None  # buffers (e.g. BatchNorm statistics) may differ: rank 0's copy is saved
        assert weight_error is not None and "'weight' on ranks [1]" in weight_error
    saved = load_file(tmp_path / "running_mean.ckpt" / "model-00001-of-00001.safetensors")
    assert torch.equal(saved["running_mean"], torch.zeros(3))


def test_quick_samples_stay_inside_tensors_past_float32_precision() -> None:
    """QUICK's sample positions are exact integers: float32 ones rounded the last past the end (IndexError on the
    CPU, a device-side assert on a GPU) for sizes such as GPT-2's token embedding, 50257 x 768 elements."""
    from lightning_sharing.core.patterns import ValidationLevel
    from lightning_sharing.distributed.validation import state_digests

    large = torch.zeros(50257 * 768, dtype=torch.uint8)
    assert state_digests({"wte": large}, ValidationLevel.QUICK) != state_digests({"wte": large + 1},
                                                                                 ValidationLevel.QUICK)
