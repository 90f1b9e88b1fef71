"""A checkpoint on an object store: its generations, and which leftovers a save may delete (docs/storage.md).

Each save writes under a generation ``g-<token>-<base>/`` of the checkpoint's prefix, ``base`` naming the manifest
version it expects to replace (``new``: none): a generation whose base is not the current manifest's version can
never be committed, an exact test (no clocks) that makes deleting it safe while other saves run.

Example:
    >>> name = generation_name("0" * 32, None)
    >>> name, parse_generation(name)
    ('g-00000000000000000000000000000000-new', ('00000000000000000000000000000000', 'new'))
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from lightning_sharing.storage.base import MANIFEST_NAME
from lightning_sharing.storage.client import ObjectClient

__all__ = ["PrefixState", "below", "clean_after_commit", "clean_directory", "delete_prefix", "generation_name",
           "manifest_data_prefix", "manifest_json", "parse_generation", "scan"]

log = logging.getLogger(__name__)
_GENERATION_RE = re.compile(r"^g-(?P<token>[0-9a-f]{32})-(?P<base>new|[0-9a-f]{16})$")


def generation_name(token: str, expected_version: str | None) -> str:
    """The generation a save with ``token`` writes into, expecting the manifest ``expected_version``."""
    return f"g-{token}-{_base(expected_version)}"


def _base(version: str | None) -> str:
    return "new" if version is None else xxhash.xxh3_64(version.encode()).hexdigest()


def parse_generation(name: str) -> tuple[str, str] | None:
    """``(token, base)`` of a generation's name, None for any other name."""
    match = _GENERATION_RE.match(name)
    return (match["token"], match["base"]) if match else None


def _dead(name: str, committed: str | None, version: str) -> bool:
    """True for a generation other than ``committed`` that can never be committed over manifest ``version``."""
    parsed = parse_generation(name)
    return parsed is not None and name != committed and parsed[1] != _base(version)


def manifest_json(raw: bytes) -> dict[str, Any]:
    """A manifest's bytes as JSON, ``{}`` if unreadable (then nothing is deleted for it)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def manifest_data_prefix(raw: bytes) -> str | None:
    """The generation a manifest's bytes name (None if unreadable or unnamed)."""
    value = manifest_json(raw).get("data_prefix")
    return value if isinstance(value, str) else None


def below(key: str) -> str:
    """The listing prefix of what is below ``key`` (``""`` for the bucket itself)."""
    return f"{key}/" if key else ""


@dataclass
class PrefixState:
    """What one listing of a checkpoint prefix showed: its manifest, generations and names of others."""

    key: str
    has_manifest: bool = False
    generations: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    @property
    def ours(self) -> bool:
        """True when the prefix holds nothing but what lightning_sharing writes (and something of it)."""
        return not self.foreign and (self.has_manifest or bool(self.generations))


def scan(client: ObjectClient, key: str) -> PrefixState:
    """List ``key/`` once and sort what is right below it (a 0-byte "folder/" marker some tools make is ignored)."""
    dirs, objects = client.list(below(key), delimiter=True)
    state = PrefixState(key)
    for name in (child.rsplit("/", 1)[-1] for child in dirs):
        (state.generations if parse_generation(name) else state.foreign).append(name)
    for info in objects:
        name = info.key[len(below(key)):]
        if name == MANIFEST_NAME:
            state.has_manifest = True
        elif name and not (name.endswith("/") and info.size == 0):
            state.foreign.append(name)
    return state


def delete_prefix(client: ObjectClient, key: str, uploads: bool = True) -> int:
    """Delete every object below ``key/`` (not ``key-other``) and, with ``uploads``, abort its unfinished uploads;
    returns the object count."""
    if not key.strip("/"):
        raise ValueError(f"refusing to delete everything in {client.url}: name a prefix inside it")
    objects = client.list(below(key), delimiter=False)[1]
    client.delete([info.key for info in objects])
    for upload in client.uploads(below(key)) if uploads else []:
        client.abort_upload(*upload)
    return len(objects)


def clean_after_commit(client: ObjectClient, state: PrefixState, committed: str, version: str) -> list[str]:
    """After ``committed`` became ``state.key``'s generation (manifest ``version``): delete the others that can never
    be committed, and every unfinished upload in them (one listing of uploads). Returns their names."""
    doomed = [name for name in state.generations if _dead(name, committed, version)]
    for name in doomed:
        delete_prefix(client, f"{state.key}/{name}", uploads=False)
    for upload_key, upload_id in client.uploads(below(state.key)):  # a generation of uploads only is not listed
        generation, _, rest = upload_key[len(below(state.key)):].partition("/")
        if rest and _dead(generation, committed, version):
            client.abort_upload(upload_key, upload_id)
            doomed += [] if generation in doomed else [generation]
    return doomed


def _clean_one(client: ObjectClient, key: str) -> list[str]:
    state = scan(client, key)
    if state.foreign or not state.generations or (state.has_manifest and len(state.generations) < 2):
        return []  # not ours, or one generation: the named one (else the checkpoint is damaged: keep it)
    if not state.has_manifest:  # an interrupted first save or removal (one job saves into a directory at a time)
        delete_prefix(client, key)
        return [key]
    raw, version = client.get(f"{key}/{MANIFEST_NAME}")
    named = manifest_data_prefix(raw)
    doomed = [name for name in state.generations if _dead(name, named, version)] if named in state.generations else []
    for name in doomed:
        delete_prefix(client, f"{key}/{name}")
    return [f"{key}/{name}" for name in doomed]


def clean_directory(client: ObjectClient, directory: str, skip: str, shown: Callable[[str], str]) -> list[str]:
    """Before a save into ``directory``: delete leftovers of interrupted saves and removals in its checkpoints but
    ``skip`` (the save's own). Returns them as ``shown`` spells a key; a failure is logged, never raised."""
    others = [key for key in client.list(below(directory), delimiter=True)[0]
              if key != skip and not key.rsplit("/", 1)[-1].startswith(".")]

    def visit(key: str) -> list[str]:
        try:
            return _clean_one(client, key)
        except Exception as exc:  # cleaning is best effort; the save itself must not fail for it
            log.warning("could not clean leftovers in %s (%s); a later save tries again", shown(key), exc)
            return []

    with ThreadPoolExecutor(max(1, min(client.max_concurrency, len(others)))) as pool:
        removed = [item for found in pool.map(visit, others) for item in found]
    for item in removed:
        log.info("removed %s, left by an interrupted save or removal", shown(item))
    return removed
