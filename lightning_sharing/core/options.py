"""``CheckpointOptions``: the settings every entry point shares, validated once.

The coordinator, ``SharingCheckpointIO``, ``SharingStrategy`` and the Fabric strategies all take the
same keyword arguments (``max_shard_size``, ``verify``, ``validation_level``, ``async_save``,
``max_pending_saves``, ``background_staging``, ``read_once``, ``incremental``); each turns them into one
``CheckpointOptions`` with ``checkpoint_options``, once, at its constructor, and passes that object down whole:
nothing below an entry point takes the fields one by one.

Example:
    >>> options = CheckpointOptions(verify="size", max_shard_size=2**30)
    >>> options.verify, options.max_shard_size
    (SIZE, 1073741824)
    >>> checkpoint_options(options, max_shard_size=None, async_save=True).async_save
    True
    >>> CheckpointOptions(max_pending_saves=0)
    Traceback (most recent call last):
    ...
    lightning_sharing.errors.ComponentDeclarationError: max_pending_saves must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lightning_sharing.core.patterns import Choice, ValidationLevel, parse_enum
from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "CheckpointOptions", "VerifyMode", "checkpoint_options"]

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # Hugging Face's default "5GB"


class VerifyMode(Choice):
    """How files are checked against the manifest before their contents are used.

    - ``CHECKSUM``: size and full checksum (the default).
    - ``SIZE``: size only, for very large checkpoints on trusted storage (misses bit flips).
    """

    CHECKSUM = "checksum"
    SIZE = "size"

    @classmethod
    def parse(cls, value: VerifyMode | str) -> VerifyMode:
        """Accept an enum member, its value (``"size"``) or its name (``"SIZE"``)."""
        try:
            return parse_enum(cls, value, "verify")
        except ComponentDeclarationError:
            choices = tuple(m.value for m in cls)
            raise ComponentDeclarationError(f"verify={value!r} must be one of {choices}") from None


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ComponentDeclarationError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class CheckpointOptions:
    """Settings shared by every entry point.

    Args:
        max_shard_size: the largest safetensors shard, in bytes (a single larger tensor gets its own).
        verify: how files are checked on load (``"checksum"`` or ``"size"``).
        validation_level: the replication check applied to Lightning's model weights at each save.
        async_save: ``save_checkpoint`` returns once the state is copied; writing and committing run
            in the background.
        max_pending_saves: with ``async_save``, how many saves may be in flight; each holds one copy of
            the state this rank writes.
        background_staging: with ``async_save``, the parameters and optimizer state are copied in the
            background too, so ``save_checkpoint`` returns before they are copied; the next
            ``optimizer.step()`` waits for the copy (``BackgroundSaver``'s documentation).
        read_once: each file every rank reads (GLOBAL and REPLICATED state) is fetched from storage by one rank,
            verified there, and broadcast to the others over the process group, the ranks splitting the files
            between them (``engine/read_once.py``). ``None`` (auto): on for object-store URLs and for jobs that
            span several nodes, off for one node on a local disk, where the page cache already shares the reads.
        incremental: a save does not write again the files whose content equals the newest complete checkpoint's in
            the same directory: it hard-links them (a local filesystem) or copies them server-side (an object
            store), so every checkpoint stays self-contained (``engine/incremental.py``, docs/storage.md).
    """

    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    verify: VerifyMode = VerifyMode.CHECKSUM
    validation_level: ValidationLevel = ValidationLevel.QUICK
    async_save: bool = False
    max_pending_saves: int = 1
    background_staging: bool = False
    read_once: bool | None = None
    incremental: bool = False

    def __post_init__(self) -> None:
        _positive_int("max_shard_size", self.max_shard_size)
        _positive_int("max_pending_saves", self.max_pending_saves)
        object.__setattr__(self, "verify", VerifyMode.parse(self.verify))
        object.__setattr__(self, "validation_level", ValidationLevel.parse(self.validation_level))
        for name in ("async_save", "background_staging", "incremental"):
            if not isinstance(getattr(self, name), bool):
                raise ComponentDeclarationError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.read_once is not None and not isinstance(self.read_once, bool):
            raise ComponentDeclarationError(f"read_once must be True, False or None (auto), got {self.read_once!r}")

    def replace(self, **changes: Any) -> CheckpointOptions:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def checkpoint_options(options: CheckpointOptions | None = None, **given: Any) -> CheckpointOptions:
    """The one ``CheckpointOptions`` of an entry point: ``options`` (default: the defaults) with the keyword
    arguments it was given applied on top; a keyword given as ``None`` is "not given".

    Every public constructor that takes option keywords (``CheckpointCoordinator``, ``SharingCheckpointIO``, the
    Lightning and Fabric strategies) calls this once and passes only the result on. An unknown name is a
    ``TypeError``, as for any keyword argument.

    Example:
        >>> checkpoint_options(max_shard_size=1024, verify=None).max_shard_size
        1024
    """
    changes = {name: value for name, value in given.items() if value is not None}
    return (options or CheckpointOptions()).replace(**changes)
