"""Replication validation: prove that REPLICATED state really is identical on every rank.

Each rank digests its state locally; the ranks compare one 62-bit hash of their digests in one all-reduce (per
group instance whose members must agree), so every rank reaches the same verdict while receiving a few bytes,
whatever the world size. Only on a mismatch are the digests themselves gathered, and then
``ReplicationMismatchError`` is raised on all ranks naming the component, the tensor paths and the diverging
ranks. ``FULL`` compares bytes against the writer's copy instead of hashes. A save folds the common case (one
instance, below ``FULL``) into its own agreement step with ``replication_digests`` and ``mismatch_error``.

Example:
    >>> check_replication("model", model.state_dict(), ValidationLevel.TENSOR)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import xxhash

from lightning_sharing.core.declarations import ValidationLevel
from lightning_sharing.distributed.ballot import ABSENT, Ballot
from lightning_sharing.distributed.basics import all_gather_object, broadcast_tensor, get_rank, get_world_size
from lightning_sharing.distributed.collectives import any_rank
from lightning_sharing.errors import ComponentDeclarationError, ReplicationMismatchError
from lightning_sharing.format.codec import EncodedState, encode_state, is_dtensor

__all__ = ["check_replication", "combined_digest", "mismatch_error", "references", "replicated_view",
           "replication_digests", "state_digests"]

_QUICK_SAMPLES = 64
_STRUCTURE = "<structure: keys and non-tensor values>"
_MAX_LISTED = 8


def replicated_view(stateful: Any, state: Any) -> Any:
    """The part of ``state`` that must be identical on every rank.

    A stateful may define ``replicated_view(state)`` to exclude entries that legitimately differ
    between ranks although one copy is saved (e.g. BatchNorm running statistics under DDP, which
    DDP overwrites from rank 0 at the next forward).
    """
    view = getattr(stateful, "replicated_view", None)
    return view(state) if callable(view) else state


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as a flat uint8 CPU tensor (works for every dtype, bfloat16 too)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


def _tensor_digest(tensor: torch.Tensor, level: ValidationLevel) -> str:
    head = f"{tensor.dtype}|{tuple(tensor.shape)}|"
    if level is ValidationLevel.QUICK and tensor.numel() > _QUICK_SAMPLES:
        flat = tensor.detach().reshape(-1)
        # Integer arithmetic: float32 positions (linspace) round the last one past the end from 2**24 elements on
        # (an IndexError on the CPU, a device-side assert that poisons the CUDA context on a GPU).
        positions = torch.arange(_QUICK_SAMPLES, device=flat.device) * (flat.numel() - 1) // (_QUICK_SAMPLES - 1)
        data = _as_bytes(flat[positions])
        return head + xxhash.xxh3_64_hexdigest(data.numpy().tobytes())
    return head + xxhash.xxh3_128_hexdigest(memoryview(_as_bytes(tensor).numpy()))


def state_digests(state: Any, level: ValidationLevel) -> dict[str, str]:
    """Per-path digests of ``state`` (one for the structure, one per stored tensor)."""
    return _digests(encode_state(state, "validation"), level)


def _digests(encoded: EncodedState, level: ValidationLevel) -> dict[str, str]:
    # A flat state's structure is its tensor names; a tree's is the tree with its non-tensor values.
    shape = [sorted(encoded.tensors), sorted(encoded.ties.items())] if encoded.flat else \
        [encoded.tree, sorted(encoded.ties.items())]
    digests = {_STRUCTURE: xxhash.xxh3_128_hexdigest(json.dumps(shape, sort_keys=True, default=str).encode())}
    for name, tensor in encoded.tensors.items():
        if is_dtensor(tensor):
            # Its pieces differ by rank by design; what must agree is what it is: shape, dtype, layout.
            digests[name] = (f"DTensor|{tensor.dtype}|{tuple(tensor.shape)}|{tuple(tensor.placements)}|"
                             f"{tuple(tensor.device_mesh.shape)}")
        elif level is ValidationLevel.FULL:
            digests[name] = f"{tensor.dtype}|{tuple(tensor.shape)}"
        else:
            digests[name] = _tensor_digest(tensor, level)
    return digests


def combined_digest(digests: dict[str, str]) -> str:
    """One digest of a component's per-path digests (what the ranks compare first)."""
    return xxhash.xxh3_128_hexdigest(json.dumps(sorted(digests.items())).encode())


def replication_digests(key: str, state: Any, level: ValidationLevel, *, dtensors: bool = False
                        ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """This rank's per-path digests of ``state`` at ``level``, and its encoded tensors (for ``FULL``)."""
    encoded = encode_state(state, key, dtensors=dtensors)
    return _digests(encoded, level), encoded.tensors


def references(world: int, writer: int, instances: Sequence[Sequence[int]] | None) -> list[int]:
    """The rank each rank's state is compared with: ``writer``, or the lowest rank of its group instance."""
    result = [writer] * world
    for members in instances or ():
        for rank in members:
            result[rank] = min(members)
    return result


def mismatch_error(key: str, level: ValidationLevel, refs: list[int], per_rank: list[dict[str, str] | None],
                   pattern: str = "REPLICATED") -> ReplicationMismatchError | None:
    """The error naming where every rank's digests differ from its reference rank's, or None when they agree."""
    if all(digests is not None for digests in per_rank):
        diverging = _differences(per_rank, refs)  # type: ignore[arg-type]
        if diverging:
            return _mismatch(key, level, refs, diverging, pattern)
    return None


def _differences(per_rank: list[dict[str, str]], references: list[int]) -> dict[str, list[int]]:
    diverging: dict[str, list[int]] = {}
    for rank, digests in enumerate(per_rank):
        if rank == references[rank]:
            continue
        reference = per_rank[references[rank]]
        for path in sorted(set(reference) | set(digests)):
            if reference.get(path) != digests.get(path):
                diverging.setdefault(path, []).append(rank)
    return diverging


def _mismatch(key: str, level: ValidationLevel, writers: list[int], diverging: dict[str, list[int]],
              pattern: str) -> ReplicationMismatchError:
    ranks = sorted({r for rs in diverging.values() for r in rs})
    listed = "; ".join(f"{path!r} on ranks {rs}" for path, rs in list(diverging.items())[:_MAX_LISTED])
    more = f" (and {len(diverging) - _MAX_LISTED} more)" if len(diverging) > _MAX_LISTED else ""
    leads = sorted({writers[r] for r in ranks})
    against = (f"rank {leads[0]}, the writing rank" if len(leads) == 1
               else f"the writing ranks {leads} of their groups")
    what = "REPLICATED state" if pattern == "REPLICATED" else f"The plain tensors and other values of {pattern} state"
    return ReplicationMismatchError(
        f"{pattern} component {key!r} differs across ranks (validation level {level.name}): ranks "
        f"{ranks} differ from {against}, at {listed}{more}. {what} must be "
        "identical on every rank: if it legitimately differs, declare it PER_RANK (or PER_GROUP); "
        "otherwise the ranks diverged (missed gradient sync, different seeds, nondeterministic updates)"
    )


def _full_compare(digests: dict[str, str], tensors: dict[str, torch.Tensor], writer: int) -> list[str]:
    """Broadcast each tensor's bytes from ``writer`` and return the paths that differ here."""
    differing = []
    for name in sorted(n for n in digests if n != _STRUCTURE and not is_dtensor(tensors[n])):
        mine = _as_bytes(tensors[name])
        theirs = broadcast_tensor(mine, src=writer, phase=f"comparing {name!r} with rank {writer}")
        if not torch.equal(mine.to(theirs.device), theirs):
            differing.append(name)
    return differing


def check_replication(key: str, state: Any, level: ValidationLevel, writer: int = 0, *, dtensors: bool = False,
                      instances: Sequence[Sequence[int]] | None = None, pattern: str = "REPLICATED") -> None:
    """Collective: raise ``ReplicationMismatchError`` on every rank if ``state`` differs anywhere.

    ``dtensors=True`` (SHARDED state) accepts ``DTensor``s and compares only what each one is (global
    shape, dtype, placements), not its pieces. ``instances`` (the ranks of each group instance, which
    hold different state) compares each rank with the lowest rank of its instance instead of ``writer``.
    ``pattern`` names the component's pattern in the error. One all-reduce (of two integers per instance)
    when every rank agrees; ``FULL`` adds one broadcast per tensor and one all-reduce.
    """
    level = ValidationLevel.parse(level)
    world = get_world_size()
    if level is ValidationLevel.NONE or world == 1:
        return
    refs = references(world, writer, instances)
    if level is ValidationLevel.FULL and len(set(refs)) > 1:
        raise ComponentDeclarationError(
            f"component {key!r}: validation level FULL compares every rank's bytes with one writing rank, but "
            f"its group instances hold different state (writers {sorted(set(refs))}); use TENSOR, which "
            "hashes every byte"
        )
    phase = f"replication check of component {key!r}"
    ballot = Ballot(phase)
    digests, tensors = ballot.run(phase, lambda: replication_digests(key, state, level, dtensors=dtensors)) or ({}, {})
    mine = refs[get_rank()]
    for reference in sorted(set(refs)):  # one hash check per group of ranks that must agree
        ballot.hashed(combined_digest(digests) if mine == reference else ABSENT)
    ballot.judge(f"replicas of {key!r}", lambda: digests, lambda per_rank: mismatch_error(key, level, refs, per_rank,
                                                                                          pattern))
    ballot.agree()
    if level is not ValidationLevel.FULL:
        return
    differing = _full_compare(digests, tensors, writer)
    if any_rank(bool(differing), phase=phase)[0]:
        diverging: dict[str, list[int]] = {}
        for rank, paths in enumerate(all_gather_object(differing, phase=phase)):
            for path in paths:
                diverging.setdefault(path, []).append(rank)
        raise _mismatch(key, level, refs, diverging, pattern)
