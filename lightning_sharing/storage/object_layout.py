"""A checkpoint on an object store: its generations, and which leftovers a save may delete.

There is no rename on an object store, so a save never writes where a reader looks. Each save writes
its files under a *generation* of the checkpoint's prefix, and the manifest, written last with a
conditional put, names the generation it commits::

    s3://bucket/run/step=500.ckpt/
      checkpoint_manifest.json                 # {"data_prefix": "g-<token>-<base>", ...}
      g-<token>-<base>/model-00001-of-00001.safetensors ...

``token`` is the save's (32 hex digits, agreed by all ranks); ``base`` says which manifest the save
expects to replace: ``new`` when there was none, else 16 hex digits of that manifest's version. A
save's commit succeeds only if the manifest is still the one it read (create-only, or ``If-Match``),
so a generation whose base is not the current manifest's version can never be committed: it belongs
to a crashed save, or to one that has lost or will lose its race. That test is exact (no clocks), and
it is what makes deleting such leftovers safe while other saves may still be running:

- after a commit, ``clean_after_commit`` deletes every other generation of the checkpoint (and its
  unfinished multipart uploads) whose base is not the new manifest's version;
- before a save, ``clean_directory`` visits the other checkpoints of the directory: in a committed one it
  deletes unnamed generations whose base is not its manifest's version; a prefix that holds
  generations and no manifest (an interrupted first save, or an interrupted removal) is deleted whole.
  That last rule assumes one job saves into a directory at a time, as the local staging cleanup does.

Nothing here deletes anything it does not recognise: a prefix holding objects of other names is left
alone, and saving over it is refused.

Example:
    >>> name = generation_name("0" * 32, None)
    >>> name
    'g-00000000000000000000000000000000-new'
    >>> parse_generation(name)
    ('00000000000000000000000000000000', 'new')
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from lightning_sharing.storage import object_s3 as _s3
from lightning_sharing.storage import object_s3_prefix as _s3_prefix
from lightning_sharing.storage.base import MANIFEST_NAME
from lightning_sharing.storage.object_common import DEFAULT_RETRY
from lightning_sharing.storage.object_store import delete_prefix, list_dir, read_versioned

__all__ = [
    "PrefixState",
    "base_tag",
    "clean_after_commit",
    "clean_directory",
    "generation_name",
    "manifest_data_prefix",
    "parse_generation",
    "scan",
]

log = logging.getLogger(__name__)

_GENERATION_RE = re.compile(r"^g-(?P<token>[0-9a-f]{32})-(?P<base>new|[0-9a-f]{16})$")
_SCAN_THREADS = 16


def base_tag(version: str | None) -> str:
    """The ``base`` part of a generation's name for a save that expects to replace manifest ``version``."""
    return "new" if version is None else xxhash.xxh3_64(version.encode()).hexdigest()


def generation_name(token: str, expected_version: str | None) -> str:
    """The generation a save with ``token`` writes into, expecting the manifest ``expected_version``."""
    return f"g-{token}-{base_tag(expected_version)}"


def parse_generation(name: str) -> tuple[str, str] | None:
    """``(token, base)`` of a generation's name, None for any other name."""
    match = _GENERATION_RE.match(name)
    return (match["token"], match["base"]) if match else None


def manifest_data_prefix(raw: bytes) -> str | None:
    """The generation a manifest's bytes name (None if unreadable or unnamed: then nothing is deleted for it)."""
    try:
        value = json.loads(raw.decode("utf-8")).get("data_prefix")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) else None


@dataclass
class PrefixState:
    """What one listing of a checkpoint prefix showed: its manifest, generations and anything else."""

    path: str
    has_manifest: bool = False
    generations: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # names lightning_sharing never writes there

    @property
    def ours(self) -> bool:
        """True when the prefix holds nothing but what lightning_sharing writes (and something of it)."""
        return not self.foreign and (self.has_manifest or bool(self.generations))


def scan(fs: Any, path: str) -> PrefixState:
    """List ``path/`` once (fresh from the store) and sort what is directly below it."""
    dirs, objects = list_dir(fs, path)
    state = PrefixState(path)
    for child in dirs:
        name = posixpath.basename(child)
        (state.generations if parse_generation(name) else state.foreign).append(name)
    for info in objects:
        name = posixpath.basename(info.path.rstrip("/"))
        if name == MANIFEST_NAME:
            state.has_manifest = True
        elif not (info.path.endswith("/") and info.size == 0):  # a "folder" marker some tools create
            state.foreign.append(name)
    return state


def _uploads(fs: Any, path: str) -> list[Any]:
    return _s3_prefix.unfinished_uploads(fs, path, DEFAULT_RETRY) if _s3.is_s3(fs) else []


def _abort(fs: Any, upload: Any) -> None:
    _s3_prefix.abort_upload(fs, upload, DEFAULT_RETRY)


def _generation_of(path: str, upload_path: str) -> str | None:
    rest = upload_path[len(path.rstrip("/")) + 1:]
    return rest.split("/", 1)[0] if "/" in rest else None


def _dead(name: str, keep: set[str], tag: str) -> bool:
    parsed = parse_generation(name)
    return parsed is not None and name not in keep and parsed[1] != tag


def clean_after_commit(fs: Any, state: PrefixState, committed: str, version: str) -> list[str]:
    """After ``committed`` was made the generation of ``state.path`` (manifest ``version``): delete the others
    that can never be committed, and their unfinished uploads. Returns what was deleted."""
    tag = base_tag(version)
    doomed = [name for name in state.generations if _dead(name, {committed}, tag)]
    for name in doomed:
        delete_prefix(fs, f"{state.path}/{name}")  # aborts the generation's unfinished uploads too
    deleted = set(doomed)
    # A generation that holds only unfinished uploads (every rank killed mid-upload) is not listed as a
    # prefix: each of its uploads is aborted here, however many ranks left one.
    for upload in _uploads(fs, state.path):
        generation = _generation_of(state.path, upload.path)
        if generation is not None and generation not in deleted and _dead(generation, {committed}, tag):
            _abort(fs, upload)
            if generation not in doomed:
                doomed.append(generation)
    return doomed


def _clean_committed(fs: Any, state: PrefixState) -> list[str]:
    if len(state.generations) < 2:
        return []  # the one generation is the named one (if it is not, the checkpoint is damaged: keep it)
    raw, version = read_versioned(fs, f"{state.path}/{MANIFEST_NAME}")
    named = manifest_data_prefix(raw)
    if named is None or named not in state.generations:
        return []
    tag = base_tag(version)
    doomed = [name for name in state.generations if _dead(name, {named}, tag)]
    for name in doomed:
        delete_prefix(fs, f"{state.path}/{name}")
    return doomed


def _clean_one(fs: Any, path: str) -> list[str]:
    state = scan(fs, path)
    if state.foreign or not state.generations:
        return []
    if state.has_manifest:
        return [f"{path}/{name}" for name in _clean_committed(fs, state)]
    delete_prefix(fs, path)
    return [path]


def clean_directory(fs: Any, directory: str, skip: str, shown: Callable[[str], str]) -> list[str]:
    """Before a save into ``directory``: delete leftovers of interrupted saves and removals in its other
    checkpoints (``skip`` is the save's own target). Returns what was deleted, as ``shown`` spells it.

    A failure to clean one prefix is logged and does not stop the save.
    """
    dirs, _ = list_dir(fs, directory)
    others = [path for path in dirs if path.rstrip("/") != skip and not posixpath.basename(path).startswith(".")]

    def visit(path: str) -> list[str]:
        try:
            return _clean_one(fs, path)
        except Exception as exc:  # cleaning is best effort; the save itself must not fail for it
            log.warning("could not clean leftovers in %s (%s); a later save tries again", shown(path), exc)
            return []

    if len(others) > 1 and _s3.is_s3(fs):  # S3 calls wait on the network; memory:// is not safe across threads
        with ThreadPoolExecutor(min(_SCAN_THREADS, len(others))) as pool:
            removed = [item for found in pool.map(visit, others) for item in found]
    else:
        removed = [item for path in others for item in visit(path)]
    for item in removed:
        log.info("removed %s, left by an interrupted save or removal", shown(item))
    return removed
