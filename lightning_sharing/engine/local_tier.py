"""The local tier at work: ``save_local`` (write on every node, copy to peer nodes) and ``restore`` (choose and load).

Because the local tier is only used at the topology it was saved at, nothing is planned or resharded: every rank
writes its own state of every component but the GLOBAL and REPLICATED ones, and its part of the node's one copy of
those (``engine/local_state.py``: the copy is spread over the node's ranks), and a restore gives every rank back
exactly that (``engine/local_files.py`` holds the files).

**save_local(step)**: every rank writes its files into ``own/.tmp-step_<N>`` (one agreement step: a failure
anywhere, a full disk say, is an error on every rank and nothing is committed); each node's first rank writes
``COMPLETE.json`` and renames the directory into place (one more); then the rank with local rank ``j`` on node ``n``
sends its files to local rank ``j`` of nodes ``n+1 .. n+replicas`` (point-to-point over the tier's own gloo group),
which write them under ``replica_of_<n>`` (agreed) and rename them into place (agreed).

**restore(directory)**: rank 0 finds the newest complete persistent checkpoint; every rank lists the steps it can
serve (its own and the replicas it holds, saved at this very topology and declaration), and every rank learns
every rank's list (one gather). The newest step at least as new as the persistent one that every rank can get
(its own copy first, else a peer's replica) is chosen, the same way on every rank (``local_plan.choose``); every rank
reads its own file and its node's shared parts from the node's disk, and holders read and send the files of ranks
whose own copy is missing (``local_plan.needs``), every file verified. A file that fails its checksum makes that
copy unusable: the ranks agree on it (one all-reduce, a gather only on failure) and choose again (the next replica,
an older step, or the persistent checkpoint), the log naming the file and the source used instead. Local steps saved
at another topology (or with other components) are ignored; when they are all there is, the tier is skipped with
one log line.

Example (every rank):
    >>> runner = LocalTierRunner(LocalTier("/local/ckpt/{node}"))                                     # doctest: +SKIP
    >>> runner.save_local(100, components, topology, declaration)                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_sharing.checkpoint.discovery import complete_checkpoints
from lightning_sharing.core.declarations import StateComponent
from lightning_sharing.core.local_tier import LocalTier
from lightning_sharing.core.topology import Topology
from lightning_sharing.distributed.async_save import BackgroundSaver
from lightning_sharing.distributed.collectives import (
    Ballot,
    all_gather_object,
    any_rank,
    get_rank,
    new_gloo_group,
    on_rank_zero,
    warn_on_rank_zero,
)
from lightning_sharing.distributed.peer_exchange import exchange_bytes
from lightning_sharing.engine import local_files as files
from lightning_sharing.engine.local_plan import (
    Layout,
    Need,
    choose,
    copy_holder,
    layout,
    needs,
    node_of,
    served_by,
)
from lightning_sharing.engine.local_state import Collected, apply_states, collect, inventory
from lightning_sharing.engine.staging import optimizer_owned
from lightning_sharing.errors import CheckpointError, ComponentDeclarationError, CorruptCheckpointError

__all__ = ["LocalTierRunner", "newest_persistent", "restore_persistent"]

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


class LocalTierRunner:
    """``save_local`` and ``restore`` of one coordinator (see the module docstring); holds the tier's gloo group."""

    def __init__(self, tier: LocalTier, on_background_failure: Callable[[int, CheckpointError], None] | None = None
                 ) -> None:
        #: With it, a background save's failure (agreed on every rank) is handed to it with the step, on every rank,
        #: instead of being raised by the saver's next wait (the Trainer goes on training).
        self.on_background_failure = on_background_failure
        self.tier = tier
        self._group: Any = None
        self._has_group = False

    def group(self) -> Any:
        """Collective the first time: the tier's own gloo group (CPU tensors whatever the default backend)."""
        if not self._has_group:
            self._group, self._has_group = new_gloo_group(), True
        return self._group

    # ------------------------------------------------------------------------------------------------ save
    def save_local(self, step: int, components: Sequence[StateComponent], topology: Topology,
                   declaration: Any, saver: BackgroundSaver | None = None, staging_roots: Sequence[Any] = ()) -> None:
        """Collective: write this node's files of ``step``, commit them, copy them to the peer nodes. With ``saver``,
        the state is collected and staged (copied) here, and written, committed and copied on the saver's thread,
        after its earlier saves; ``saver.wait()`` waits for it and raises its failure on every rank. Background
        staging (``saver.background_staging``) copies the parameters and optimizer state late, as for persistent
        saves (``staging_roots`` as there)."""
        rank = get_rank()
        lay = layout(self.tier, topology, rank)
        what = f"local checkpoint step {step}"
        if saver is not None:
            saver.make_room()  # raises a failed earlier save's error, on every rank
        ballot = Ballot(f"saving {what}", self.group())
        collected: Collected | None = ballot.run(f"collecting the state of {what}", lambda: collect(components, lay))
        # The ranks split the node's shared copy alike only if they hold it alike: max(h) == -max(-h) iff all equal.
        digest = collected.structure_hash() if collected is not None else 0
        highest, lowest = ballot.maximum(digest), ballot.maximum(-digest)
        ballot.agree()
        assert collected is not None  # agree() raised on every rank otherwise
        spread = highest.value == -lowest.value
        if not spread:
            warn_on_rank_zero(log, "local tier: the ranks hold REPLICATED tensors of different names, shapes or "
                              "dtypes; each node's first rank writes the node's whole copy of %s", what)
        bundles = collected.bundles(lay, spread)
        if saver is None:
            self._write(step, lay, bundles, topology, declaration, self.group())
            return
        owned = optimizer_owned(components, staging_roots) if saver.background_staging else None
        staged = {name: saver.stage(tensors, owned) for name, tensors in bundles.items()}
        group = saver.group()
        handler = self.on_background_failure
        saver.submit(Path(what), lambda: self._write(step, lay, staged, topology, declaration, group),
                     [t for tensors in staged.values() for t in tensors.values()],
                     None if handler is None else lambda error: handler(step, error))

    def _write(self, step: int, lay: Layout, bundles: dict[str, dict[str, torch.Tensor]], topology: Topology,
               declaration: Any, group: Any) -> None:
        """Collective over ``group``: write, commit and replicate ``step`` (the second half of ``save_local``)."""
        own = files.own_dir(self.node_dir_of(lay))
        temp, final = files.temp_dir(own, step), files.step_dir(own, step)
        what = f"local checkpoint step {step}"
        ballot = Ballot(f"saving {what}", group)
        ballot.run(f"writing {what}", lambda: _write_own(temp, bundles, lay))
        ballot.agree()

        def commit() -> None:
            entries = {}
            for member in lay.nodes[lay.node]:
                entries.update(json.loads((temp / f"{files.rank_file(member)}.sum").read_bytes()))
            record = files.complete_record(step, lay.node, topology.to_json(), _jsonable(declaration), entries)
            files.commit_step(temp, final, record)
            files.remove_old_steps(own, self.tier.keep)

        ballot = Ballot(f"committing {what}", group)
        ballot.run(f"committing {what}", commit if lay.rank == lay.lead else None)
        ballot.agree()
        if lay.replicas:
            self._replicate(step, lay, final, group)
        log.info("saved %s in %s%s", what, final, f" and on {lay.replicas} peer node(s)" if lay.replicas else "")

    def _replicate(self, step: int, lay: Layout, final: Path, group: Any) -> None:
        """Send this rank's files of ``step`` to its holders; receive and commit the replicas it holds."""
        names = [files.rank_file(lay.rank), files.shared_file(lay.local)]
        names += [files.COMPLETE_NAME] if lay.rank == lay.lead else []
        what = f"local checkpoint step {step}"
        ballot = Ballot(f"copying {what} to peer nodes", group)
        message = ballot.run(f"reading {what} to send it", lambda: files.pack(final, names))
        sources = [lay.nodes[origin][lay.local] for origin in lay.origins()]
        received = exchange_bytes(dict.fromkeys(lay.holders(lay.node, lay.local), message), sources, group)
        parent = self.node_dir_of(lay)

        def store() -> None:
            with files.write_batch():
                for origin, source in zip(lay.origins(), sources, strict=True):
                    data = received[source]
                    if data is None:
                        raise CorruptCheckpointError(f"rank {source} (node {origin}) could not send its files")
                    temp = files.temp_dir(files.replica_dir(parent, origin), step)
                    try:
                        temp.mkdir(parents=True, exist_ok=True)
                        for name, content in files.unpack(data, f"rank {source}").items():
                            files.write_raw(temp, name, content)
                    except OSError as exc:
                        raise CheckpointError(f"writing node {origin}'s replica into the local tier directory {temp} "
                                              f"failed: {exc}") from exc

        ballot.run(f"storing the replicas of {what}", store)
        ballot.agree()

        def commit() -> None:
            for origin in lay.origins():
                replicas = files.replica_dir(parent, origin)
                files.place(files.temp_dir(replicas, step), files.step_dir(replicas, step))
                files.remove_old_steps(replicas, self.tier.keep)

        ballot = Ballot(f"committing the replicas of {what}", group)
        ballot.run(f"committing the replicas of {what}", commit if lay.rank == lay.lead else None)
        ballot.agree()

    def node_dir_of(self, lay: Layout) -> Path:
        """The tier's directory on ``lay``'s node (``{node}`` replaced by its index)."""
        return Path(self.tier.directory_for(lay.node))

    # --------------------------------------------------------------------------------------------- restore
    def restore(self, directory: Any, components: Sequence[StateComponent], topology: Topology, declaration: Any,
                load_persistent: Callable[[Any], None], storage_options: dict[str, Any] | None = None) -> int | None:
        """Collective: load the newest of the local tier and the persistent checkpoints under ``directory``;
        returns its step (None: nothing to restore). ``load_persistent(path)`` loads a persistent checkpoint."""
        persistent = on_rank_zero("finding the newest persistent checkpoint",
                                  lambda: newest_persistent(directory, storage_options), self.group())
        step = self.restore_local(components, topology, declaration, None if persistent is None else persistent[1],
                                  "loading the persistent checkpoint" if persistent else "nothing to restore")
        if step is not None:
            return step
        return _load_persistent(persistent, directory, load_persistent)

    def restore_local(self, components: Sequence[StateComponent], topology: Topology, declaration: Any,
                      floor: int | None = None, otherwise: str = "nothing restored") -> int | None:
        """Collective: load the newest local step (not older than ``floor``) every rank can get; its step, or None
        when there is none (``otherwise`` says in the log what the caller does then)."""
        group = self.group()
        try:
            lay = layout(self.tier, topology, get_rank())
        except ComponentDeclarationError as exc:  # the same on every rank: the topology is
            warn_on_rank_zero(log, "local tier skipped: %s; %s", exc, otherwise)
            return None
        try:
            report = inventory(self.node_dir_of(lay), lay, topology, _jsonable(declaration))
        except Exception as exc:  # this rank serves nothing, and still joins the gather below (no rank waits alone)
            log.warning("local tier: cannot list %s: %s: %s", self.node_dir_of(lay), type(exc).__name__, exc)
            report = {"held": [], "other": None}
        reports = all_gather_object(report, group, phase="listing the local checkpoints")
        other = next((r["other"] for r in reports if r["other"]), None)
        if other is not None and not any(r["held"] for r in reports):
            warn_on_rank_zero(log, "local tier skipped: %s; %s", other, otherwise)
            return None
        if other is not None:
            warn_on_rank_zero(log, "local tier: ignoring the local checkpoints of another job layout (%s)", other)
        return self._restore_local(lay, [{tuple(h) for h in r["held"]} for r in reports], floor, components, group)

    def _restore_local(self, lay: Layout, held: list[set[tuple[int, int]]], floor: int | None,
                       components: Sequence[StateComponent], group: Any) -> int | None:
        refused: set[tuple[int, int, int]] = set()  # (holder, target, step)
        while (choice := choose(lay, held, floor, refused)) is not None:
            step, sources = choice
            for target, source in enumerate(sources):
                if source != target:
                    warn_on_rank_zero(log, "local tier: rank %d (node %d) takes step %d from the replica on rank %d "
                                      "(node %d): its own copy is missing or refused", target,
                                      node_of(lay, target), step, source, node_of(lay, source))
            states, failures = self._fetch(lay, step, sources, group)
            if any_rank(bool(failures), group=group, phase="checking the local checkpoint files")[0]:
                for per_rank in all_gather_object(failures, group, phase="naming the refused local files"):
                    for holder, target, reason in per_rank:
                        refused.add((holder, target, step))
                        warn_on_rank_zero(log, "local tier: step %d for rank %d refused (%s); trying the next source",
                                          step, target, reason)
                continue
            ballot = Ballot(f"loading local checkpoint step {step}", group)
            ballot.run(f"loading local checkpoint step {step}", lambda s=states: apply_states(components, s))
            ballot.agree()
            warn_on_rank_zero(log, "restored step %d from the local tier (%s)", step,
                              "own copies" if all(s == t for t, s in enumerate(sources)) else "with peer replicas")
            self._forget_newer(lay, step)
            return step
        if floor is not None:
            self._forget_newer(lay, floor)
        return None

    def _forget_newer(self, lay: Layout, step: int) -> None:
        """The node's first rank removes the local steps newer than ``step``, the one the run resumes from: they
        could not be restored, and belong to a timeline the resumed run leaves (not a collective; never raises)."""
        if lay.rank != lay.lead:
            return
        node_dir = self.node_dir_of(lay)
        parents = [files.own_dir(node_dir)] + [files.replica_dir(node_dir, origin) for origin in lay.origins()]
        for parent in parents:
            for newer in [s for s in files.list_steps(parent) if s > step]:
                try:
                    files.remove_step(parent, newer)
                    log.info("local tier: removed %s (newer than the resumed step %d)", files.step_dir(parent, newer),
                             step)
                except OSError as exc:
                    log.warning("local tier: could not remove %s: %s", files.step_dir(parent, newer), exc)

    def _fetch(self, lay: Layout, step: int, sources: list[int], group: Any
               ) -> tuple[dict[str, Any], list[tuple[int, int, str]]]:
        """This rank's states of ``step`` (read here, or sent by the ranks serving them), and the failures it saw, as
        (rank whose copy failed, rank whose files they are, why)."""
        me = lay.rank
        failures: list[tuple[int, int, str]] = []
        bodies: dict[Path, dict[str, Any]] = {}

        def read(need: Need, reader: Callable[[Path, dict[str, Any]], Any]) -> Any:
            folder = self._folder(lay, need.origin, step)
            try:
                if folder not in bodies:
                    bodies[folder] = files.read_complete(folder)
                return reader(folder, bodies[folder])
            except Exception as exc:  # a refusal the ranks agree on below, never a rank leaving alone
                log.warning("local tier: refusing %s for rank %d: %s", folder / need.name, need.origin, exc)
                holder = copy_holder(lay, me, need.origin)
                failures.append((holder, need.origin, f"{'own copy' if holder == need.origin else 'replica'} on "
                                 f"rank {holder}: {exc}"))
                return None

        got: dict[str, dict[str, torch.Tensor] | None] = {}
        wanted = needs(lay, sources, me)
        for need in wanted:
            if need.provider == me:
                got[need.name] = read(need, lambda folder, body, n=need.name: files.read_verified(folder, n, body))
        sends: dict[int, memoryview | None] = {}
        for target, served in served_by(lay, sources).items():
            # One folder: a holder's replica of the target's node, or a node-mate's own copy.
            sends[target] = read(served[0], lambda folder, body, s=served: files.pack(
                folder, [need.name for need in s], body))
        providers = sorted({need.provider for need in wanted if need.provider != me})
        received = exchange_bytes(sends, providers, group, phase=f"sending local checkpoint step {step} to its ranks")
        for provider in providers:
            data = received[provider]
            if data is None:  # the provider could not read them: it reports that itself
                continue
            try:
                given = files.unpack(data, f"rank {provider}")
                asked = {need.name for need in wanted if need.provider == provider}
                if set(given) != asked:
                    raise CorruptCheckpointError(f"rank {provider} sent the files {sorted(given)}, not {sorted(asked)}")
                for name, content in given.items():
                    got[name] = files.parse_tensors(content, name)
            except Exception as exc:  # agreed on below, as a refusal of that source
                failures += [(provider, need.origin, f"files from rank {provider}: {type(exc).__name__}: {exc}")
                             for need in wanted if need.provider == provider]
        if failures or any(got.get(need.name) is None for need in wanted):
            return {}, failures
        states = files.states_of(got.pop(files.rank_file(me)), files.rank_file(me))  # type: ignore[arg-type]
        shared: dict[str, torch.Tensor] = {}
        for tensors in got.values():
            shared.update(tensors or {})
        states.update(files.states_of(shared, f"the shared files of node {lay.node}"))
        return states, failures

    def _folder(self, lay: Layout, origin: int, step: int) -> Path:
        """Where this rank finds ``origin``'s files of ``step``: its node's own copies, or a replica it holds."""
        origin_node, node_dir = node_of(lay, origin), self.node_dir_of(lay)
        parent = files.own_dir(node_dir) if origin_node == lay.node else files.replica_dir(node_dir, origin_node)
        return files.step_dir(parent, step)


def restore_persistent(directory: Any, load_persistent: Callable[[Any], None],
                       storage_options: dict[str, Any] | None = None, group: Any = None) -> int | None:
    """Collective: load the newest complete persistent checkpoint under ``directory``; its step (None: none)."""
    persistent = on_rank_zero("finding the newest persistent checkpoint",
                              lambda: newest_persistent(directory, storage_options), group)
    return _load_persistent(persistent, directory, load_persistent)


def _load_persistent(persistent: tuple[str, int] | None, directory: Any,
                     load_persistent: Callable[[Any], None]) -> int | None:
    if persistent is None:
        warn_on_rank_zero(log, "nothing to restore: no local checkpoint and no complete checkpoint under %s",
                          directory)
        return None
    warn_on_rank_zero(log, "restoring step %s from the persistent checkpoint %s", persistent[1], persistent[0])
    load_persistent(persistent[0])
    return persistent[1]


def newest_persistent(directory: Any, storage_options: dict[str, Any] | None) -> tuple[str, int] | None:
    """Rank 0: the newest complete persistent checkpoint under ``directory`` and its step, or None."""
    if directory is None:
        return None
    found = complete_checkpoints(directory, storage_options)
    return None if not found else (str(found[0][0]), found[0][1])


def _write_own(temp: Path, bundles: dict[str, dict[str, torch.Tensor]], lay: Layout) -> None:
    """This rank's files into ``temp``, durable, and their sizes and checksums for the node's first rank."""
    try:
        temp.mkdir(parents=True, exist_ok=True)
        with files.write_batch():
            entries = {name: files.write_file(temp, name, tensors) for name, tensors in bundles.items()}
        (temp / f"{files.rank_file(lay.rank)}.sum").write_text(json.dumps(entries))
    except OSError as exc:
        raise CheckpointError(f"writing into the local tier directory {temp} failed: {exc}") from exc
