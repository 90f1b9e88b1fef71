"""Both copy formats through the one interface, in one process: plan -> write -> commit -> read back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.statefuls import Holder

from lightning_sharing import CheckpointManifest, SharingPattern, StateComponent
from lightning_sharing.core.options import CheckpointOptions, VerifyMode
from lightning_sharing.core.rules import RULES, placements
from lightning_sharing.core.topology import Topology
from lightning_sharing.engine.chunk_format import ChunkFormat
from lightning_sharing.engine.commit import CheckpointTarget, check_visible, staged
from lightning_sharing.engine.copy_format import CopyFormat, LoadContext, write_file
from lightning_sharing.engine.formats import all_formats, format_for
from lightning_sharing.engine.manifest_builder import build_manifest
from lightning_sharing.engine.verified_files import ComponentFiles
from lightning_sharing.engine.whole_format import WholeTensorFormat
from lightning_sharing.errors import CheckpointError
from lightning_sharing.storage import LocalStore


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(6, 4, generator=generator),
            "layer.weight": torch.randn(5, 4, generator=generator, dtype=torch.float64),
            "layer.bias": torch.arange(5, dtype=torch.int32),
            "empty": torch.zeros(0, 3)}


def _tree(seed: int) -> dict[str, Any]:
    return {"step": 7, "moments": {"m": torch.full((3,), float(seed)), "v": [torch.ones(2, 2) * seed, 1.5]},
            "name": "adam"}


def _save(fmt: CopyFormat, path: Path, components: list[StateComponent], options: CheckpointOptions) -> None:
    """One process's save, step by step through the interface, committed through the staged commit."""
    topology, store = Topology.single(), LocalStore()
    target = CheckpointTarget(store, str(path), "a" * 32)
    with staged(target, f"preparing to write {path}") as root:
        written = []
        with store.write_batch():
            for component in components:
                (placement,) = placements(component.key, component.sharing_pattern, topology)
                plan = fmt.plan(component.key, placement, component.stateful.state_dict(), 0, options)
                written.append(fmt.write(store, root, plan, 0))
        check_visible(store, root, written)
        extra = {c.key: [write_file(store, root, job, 0) for job in fmt.merge(c, [w for w in written
                                                                                  if w.key == c.key])]
                 for c in components}
        manifest = build_manifest(components, topology, written, extra, step=1, metadata={})
        target.commit(root, manifest.dumps().encode("utf-8"))


def _load(fmt: CopyFormat, path: Path, component: StateComponent) -> None:
    manifest = CheckpointManifest.load(path)
    context = LoadContext(LocalStore(), str(path), Topology.from_json(manifest.topology), Topology.single(),
                          strict=True, mode=VerifyMode.CHECKSUM, rank=0)
    load = fmt.prepare_load(component, manifest.components[component.key], context)
    assert load.entries == () and load.held == ()
    load.finish(context.store, context.root)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(("pattern", "kind", "files"), [
    (SharingPattern.REPLICATED, WholeTensorFormat, ["model-00001-of-00003.safetensors",
                                                    "model.safetensors.index.json"]),
    (SharingPattern.SHARDED, ChunkFormat, ["model/chunks-00000.safetensors", "model/index.json"]),
])
def test_each_copy_format_plans_writes_commits_and_reads_back(tmp_path: Path, pattern, kind, files) -> None:
    fmt = format_for(pattern)
    assert isinstance(fmt, kind) and fmt is format_for(pattern.value)  # chosen once, from the rule's record
    model, optim = _weights(1), _tree(2)
    components = [StateComponent("model", Holder(model), pattern), StateComponent("optim", Holder(optim), pattern),
                  StateComponent("loops", Holder({"epoch": 3}), pattern)]
    _save(fmt, tmp_path / "a.ckpt", components, CheckpointOptions(max_shard_size=100))

    saved = CheckpointManifest.load(tmp_path / "a.ckpt")
    listed = {entry.path for entry in saved.components["model"].files}
    assert set(files) <= listed and "optim.json" in {e.path for e in saved.components["optim"].files}
    assert not list(tmp_path.glob(".staging-*"))  # committed: the write root became the checkpoint

    for key, original, fresh in (("model", model, {k: torch.zeros_like(v) for k, v in _weights(9).items()}),
                                 ("optim", optim, None), ("loops", {"epoch": 3}, None)):
        holder = Holder(fresh)
        _load(fmt, tmp_path / "a.ckpt", StateComponent(key, holder, pattern))
        assert _same(original, holder.state), key

    # The export reads the same files back as full tensors, through the same interface.
    full = fmt.full_tensors(ComponentFiles(LocalStore(), str(tmp_path / "a.ckpt"), "model", saved.components["model"],
                                           VerifyMode.CHECKSUM))
    assert full is not None and {t.name for t in full.tensors} == set(model)
    try:
        assert all(torch.equal(full.tensor(name), tensor) for name, tensor in model.items())
    finally:
        full.close()
    loops = fmt.full_tensors(ComponentFiles(LocalStore(), str(tmp_path / "a.ckpt"), "loops", saved.components["loops"],
                                            VerifyMode.CHECKSUM))
    assert loops is None or loops.tensors == []  # no tensors: no index (whole tensors), an empty one (chunks)


def test_a_failed_commit_leaves_nothing_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    fmt = format_for(SharingPattern.SHARDED)
    good = [StateComponent("model", Holder(_weights(1)), SharingPattern.SHARDED)]
    _save(fmt, tmp_path / "a.ckpt", good, CheckpointOptions())
    before = {p.name: p.read_bytes() for p in (tmp_path / "a.ckpt").rglob("*") if p.is_file()}

    class Broken(CheckpointTarget):
        def commit(self, write_root: str, last: bytes) -> None:
            raise CheckpointError("injected")

    store = LocalStore()
    with pytest.raises(CheckpointError, match="injected"):
        with staged(Broken(store, str(tmp_path / "a.ckpt"), "b" * 32), "preparing") as root:
            (store_file := Path(root) / "model" / "x.json").parent.mkdir(parents=True)
            store_file.write_text("{}")
            Broken(store, str(tmp_path / "a.ckpt"), "b" * 32).commit(root, b"{}")
    assert not list(tmp_path.glob(".staging-*"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "a.ckpt").rglob("*") if p.is_file()} == before


def test_every_rule_names_a_copy_format_with_an_implementation() -> None:
    kinds = {type(format_for(p)) for p in RULES}
    assert kinds == {WholeTensorFormat, ChunkFormat} and len(all_formats()) == 2
    assert [p for p in RULES if format_for(p).holds_dtensors] == [SharingPattern.SHARDED]
