"""One copy of a component on disk: Hugging Face sharded safetensors plus, for trees, a JSON file.

For a copy with stem ``S`` (e.g. ``model`` or ``rng/rank-00001``) the files are:

- ``S-00001-of-0000N.safetensors``: the tensors, at most ``max_shard_size`` bytes per shard
  (a single larger tensor gets a shard of its own); an incremental save adds shards of their own for tensors that
  do not change, ``S-frozen-00001-of-0000N.safetensors`` and ``S-stable-...`` (``core.rules.SHARD_GROUPS``);
- ``S.safetensors.index.json``: ``{"metadata": {"total_size": ..., "tied": {...}}, "weight_map": ...}``
  exactly as Hugging Face writes it, so ``transformers`` and plain ``safetensors`` can read it;
- ``S.json``: the structure of a non-flat state (optimizer, scheduler, RNG), tensors by reference.

Writing is planned in ``write_plan`` and streamed by ``tensor_files``; this module names the files
and reads a copy back.

Example:
    >>> state = read_payload("model", listed, open_file, read_tensors, flat=True)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_sharing.core.rules import SHARD_GROUPS
from lightning_sharing.errors import CheckpointError, CorruptCheckpointError
from lightning_sharing.format.codec import decode_state
from lightning_sharing.format.gc_pause import collection_paused

__all__ = [
    "check_json_size",
    "index_name",
    "json_bytes",
    "max_json_bytes",
    "merged_index",
    "parse_index",
    "parse_json",
    "read_payload",
    "shard_pattern",
    "tree_name",
]

TREE_FORMAT = "lightning_sharing.tree"
_MAX_JSON_BYTES = 256 * 1024 * 1024
#: Raises the limit on the JSON files a load parses (and a save writes) for jobs whose chunk index outgrows it.
MAX_JSON_ENV = "LIGHTNING_SHARING_MAX_JSON_BYTES"


def max_json_bytes() -> int:
    """The largest JSON file a load parses: 256 MiB, or ``LIGHTNING_SHARING_MAX_JSON_BYTES`` when set.

    The bound keeps a damaged or hostile file from exhausting memory; a chunk index grows with the number of chunks
    (one record each: about 279 MiB for a 70B model's optimizer state on 1,024 ranks, docs/benchmarks/scale.md).
    """
    value = os.environ.get(MAX_JSON_ENV)
    if not value:
        return _MAX_JSON_BYTES
    try:
        limit = int(value)
    except ValueError:
        raise CheckpointError(f"{MAX_JSON_ENV} must be a number of bytes, got {value!r}") from None
    if limit <= 0:
        raise CheckpointError(f"{MAX_JSON_ENV} must be positive, got {limit}")
    return limit


def check_json_size(size: int, name: str) -> None:
    """At save: refuse a JSON file a load would refuse, before anything is committed (such a checkpoint would
    save but never load)."""
    limit = max_json_bytes()
    if size > limit:
        raise CheckpointError(
            f"{name} would be {size} bytes, over the {limit}-byte limit a load accepts for a JSON file: the checkpoint "
            f"could be saved but not loaded, so the save is refused. Raise the limit with {MAX_JSON_ENV}=<bytes> in "
            "the environment of every rank, for the saving job and for every job that loads the checkpoint")


def index_name(stem: str) -> str:
    """Relative path of the safetensors index of copy ``stem``."""
    return f"{stem}.safetensors.index.json"


def tree_name(stem: str) -> str:
    """Relative path of the JSON structure of copy ``stem``."""
    return f"{stem}.json"


def shard_pattern(stem: str) -> re.Pattern[str]:
    """The names (without folder) of copy ``stem``'s safetensors shards."""
    groups = "|".join(SHARD_GROUPS)
    return re.compile(re.escape(posixpath.basename(stem)) + rf"-(?:(?:{groups})-)?\d{{5}}-of-\d{{5}}\.safetensors")


def json_bytes(data: Any) -> bytes:
    """Compact, strict JSON (NaN and infinities are refused)."""
    return json.dumps(data, indent=None, separators=(",", ":"), allow_nan=False).encode("utf-8")


def merged_index(indexes: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One Hugging Face index (``{key}.safetensors.index.json``) covering copies with disjoint tensor names.

    ``indexes`` holds ``(stem, index_json)`` for each copy; the weight map points into their folders.
    """
    weight_map: dict[str, str] = {}
    tied: dict[str, str] = {}
    total = 0
    for stem, index in indexes:
        folder = posixpath.dirname(stem)
        for name, file in index["weight_map"].items():
            weight_map[name] = posixpath.join(folder, file) if folder else file
        tied.update(index["metadata"].get("tied", {}))
        total += int(index["metadata"]["total_size"])
    metadata: dict[str, Any] = {"total_size": total, "format": "pt"}
    if tied:
        metadata["tied"] = tied
    return {"metadata": metadata, "weight_map": weight_map}


def parse_json(raw: bytes, what: str, name: str) -> Any:
    """Parse a JSON file's bytes; ``what`` and ``name`` describe it in errors."""
    limit = max_json_bytes()
    if len(raw) > limit:
        raise CorruptCheckpointError(f"{what} {name} is {len(raw)} bytes, over the {limit}-byte limit for a JSON "
                                     f"file (raise it with {MAX_JSON_ENV}=<bytes> if the file is genuine)")
    try:
        with collection_paused():  # a chunk index on thousands of ranks is millions of objects (format/gc_pause.py)
            return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, or an integer too long to convert
        raise CorruptCheckpointError(f"{what} {name} is not valid JSON: {exc}") from exc


def parse_index(raw: bytes, name: str) -> dict[str, Any]:
    """Parse and shape-check a safetensors index file's bytes."""
    index = parse_json(raw, "safetensors index", name)
    if not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)
            and isinstance(index.get("metadata", {}), dict)):
        raise CorruptCheckpointError(f"safetensors index {name} has no weight_map object")
    index.setdefault("metadata", {})
    return index


def read_payload(stem: str, available: set[str], read_file: Callable[[str], bytes],
                 read_tensors: Callable[[str], dict[str, torch.Tensor]], flat: bool) -> Any:
    """Read one copy back into a state dict.

    ``available`` holds the component's files as listed in the manifest; ``read_file(rel)`` returns
    the verified bytes of a listed JSON file and ``read_tensors(rel)`` the verified tensors of a
    listed shard (both refuse anything else).
    """
    tensors: dict[str, torch.Tensor] = {}
    ties: dict[str, str] = {}
    if index_name(stem) in available:
        index = parse_index(read_file(index_name(stem)), index_name(stem))
        shard_re = shard_pattern(stem)
        folder = posixpath.dirname(stem)
        for file in sorted(set(index["weight_map"].values())):
            if not isinstance(file, str) or not shard_re.fullmatch(file):
                raise CorruptCheckpointError(
                    f"index {index_name(stem)} points to {file!r}, which is not a shard of {stem}"
                )
            rel = posixpath.join(folder, file) if folder else file
            tensors.update(read_tensors(rel))
        missing = sorted(set(index["weight_map"]) - set(tensors))
        if missing:
            raise CorruptCheckpointError(f"tensors {missing[:5]} listed in {index_name(stem)} are in no shard")
        raw_ties = index["metadata"].get("tied", {})
        ties = {str(k): str(v) for k, v in raw_ties.items()} if isinstance(raw_ties, dict) else {}
    if flat:
        if not tensors:
            raise CorruptCheckpointError(f"copy {stem} is stored as tensors but has no safetensors index")
        return decode_state(None, tensors, ties, flat=True)
    body = parse_json(read_file(tree_name(stem)), "state structure", tree_name(stem))
    if not (isinstance(body, dict) and body.get("format") == TREE_FORMAT and body.get("version") == 1):
        raise CorruptCheckpointError(f"{tree_name(stem)} is not a lightning_sharing state structure (version 1)")
    tree_ties = body.get("ties") or {}
    if not isinstance(tree_ties, dict):
        raise CorruptCheckpointError(f"{tree_name(stem)} has a malformed ties table")
    return decode_state(body.get("tree"), tensors, {**ties, **tree_ties}, flat=False)
