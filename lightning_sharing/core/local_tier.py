"""``LocalTier``: the settings of the fast recovery tier (node-local checkpoints, copied to peer nodes).

A local checkpoint is written by every node into its own storage (a local disk, ``/dev/shm``) and sent to
``replicas`` other nodes over the process group, so that a restart on the same topology resumes from it without
reading the persistent checkpoint from shared storage. The tier is a plain setting here; the coordinator's
``save_local`` and ``restore`` (``engine/local_tier.py``) do the work.

Example:
    >>> tier = LocalTier("/local/ckpt/{node}", replicas=1, keep=2, every_n_steps=50)
    >>> tier.directory_for(node=3)
    '/local/ckpt/3'
    >>> LocalTier("/local/ckpt", keep=0)
    Traceback (most recent call last):
    ...
    lightning_sharing.errors.ComponentDeclarationError: LocalTier(keep=0): keep must be a positive integer (the \
number of local steps each node keeps of its own and of each peer's replicas)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lightning_sharing.errors import ComponentDeclarationError

__all__ = ["NODE_PLACEHOLDER", "LocalTier"]

#: Replaced in ``LocalTier.directory`` by the node index (torchrun's ``GROUP_RANK``, as in the topology).
NODE_PLACEHOLDER = "{node}"


@dataclass(frozen=True)
class LocalTier:
    """Node-local checkpoints, each node's files copied to ``replicas`` peer nodes.

    Args:
        directory: node-local storage for the tier; ``{node}`` in it is replaced by the node index, so that
            simulated nodes on one machine (or a shared scratch mount) get separate directories.
        replicas: how many other nodes hold a copy of each node's files (0: none; more than the other nodes
            there are: every other node).
        keep: how many local steps a node keeps, of its own and, separately, of each peer's replicas.
        every_n_steps: for the Lightning and Fabric strategies: save locally every N training steps (None: only
            when ``save_local`` is called).
    """

    directory: str | os.PathLike[str]
    replicas: int = 1
    keep: int = 2
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        directory = self.directory
        if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
            raise ComponentDeclarationError(f"LocalTier(directory={directory!r}): directory must be a non-empty "
                                            "path on node-local storage (it may contain {node})")
        text = os.fspath(directory)
        if "://" in str(text):
            raise ComponentDeclarationError(
                f"LocalTier(directory={text!r}): the local tier lives on node-local storage, not a URL; keep "
                "persistent checkpoints on the object store and give the tier a local path such as /local/ckpt/{node}")
        stripped = str(text).replace(NODE_PLACEHOLDER, "")
        if "{" in stripped or "}" in stripped:
            raise ComponentDeclarationError(f"LocalTier(directory={text!r}): the only placeholder a directory may "
                                            f"hold is {NODE_PLACEHOLDER} (the node index)")
        _check_int("replicas", self.replicas, 0, "how many other nodes hold a copy of each node's files; 0: none")
        _check_int("keep", self.keep, 1, "the number of local steps each node keeps of its own and of each peer's "
                                         "replicas")
        if self.every_n_steps is not None:
            _check_int("every_n_steps", self.every_n_steps, 1, "save locally every N training steps; None: only "
                                                               "when save_local is called")

    def directory_for(self, node: int) -> str:
        """The tier's directory on node ``node`` (``{node}`` replaced by its index)."""
        return str(os.fspath(self.directory)).replace(NODE_PLACEHOLDER, str(node))


def _check_int(name: str, value: object, lowest: int, meaning: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        wanted = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
        raise ComponentDeclarationError(f"LocalTier({name}={value!r}): {name} must be {wanted} ({meaning})")
