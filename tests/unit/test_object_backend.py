"""The object-store backend in one process: dispatch, layout, replacement, leftovers, removal (memory://, and s3://
on moto's server where S3 behaves differently: listing caches, ranged reads, the command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import fsspec
import pytest
import torch
from support.launch import ROOT, env
from support.s3 import FaultProxy
from support.statefuls import Holder

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointManifest,
    ComponentDeclarationError,
    ManifestError,
    SharingPattern,
    StateComponent,
    _faults,
    find_latest_checkpoint,
)
from lightning_sharing.storage import LocalStore, remove_checkpoint, store_for
from lightning_sharing.storage.generations import generation_name, parse_generation, scan
from lightning_sharing.storage.object_store import ObjectStore, open_client


@pytest.fixture
def root():
    """A fresh memory:// prefix (memory:// is one store per process), emptied afterwards."""
    url = f"memory://t-{uuid.uuid4().hex[:12]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


def _coordinator(value: float, **kwargs) -> tuple[CheckpointCoordinator, torch.nn.Linear, Holder]:
    torch.manual_seed(int(value))
    model, extra = torch.nn.Linear(3, 2), Holder({"value": value, "t": torch.full((4,), value)})
    return CheckpointCoordinator([StateComponent("model", model, SharingPattern.REPLICATED),
                                  StateComponent("extra", extra, SharingPattern.GLOBAL)], **kwargs), model, extra


def _objects(url: str) -> list[str]:
    base = "/" + url.split("://", 1)[1]  # memory:// paths as fsspec's memory filesystem spells them
    return sorted(path[len(base) + 1:] for path in fsspec.filesystem("memory").find(base))


def _generations(url: str) -> list[str]:
    client, key, _ = open_client(url)
    return scan(client, key).generations


def _generation(url: str) -> str:
    return CheckpointManifest.load(url).data_prefix


# --------------------------------------------------------------------------- dispatch and format


def test_store_for_dispatches_paths_and_file_urls_to_the_local_store_and_other_urls_to_the_object_store(tmp_path):
    assert type(store_for(tmp_path)) is LocalStore and type(store_for(f"file://{tmp_path}")) is LocalStore
    assert type(store_for("memory://bucket/run")) is ObjectStore
    with pytest.raises(ComponentDeclarationError, match="only apply to object-store URLs"):
        store_for(tmp_path, {"anon": True})
    with pytest.raises(ComponentDeclarationError, match="'nosuch://x/y' is not a location fsspec knows"):
        store_for("nosuch://x/y")


def test_a_local_checkpoint_has_no_data_prefix_in_its_manifest(tmp_path):
    coordinator, _, _ = _coordinator(1.0)
    coordinator.save_checkpoint(tmp_path / "step=1.ckpt", step=1)
    assert "data_prefix" not in json.loads((tmp_path / "step=1.ckpt" / "checkpoint_manifest.json").read_text())
    assert CheckpointManifest.load(tmp_path / "step=1.ckpt").data_prefix is None


@pytest.mark.parametrize("bad", ["../elsewhere", "/abs", "a/../b", ""])
def test_a_data_prefix_leaving_the_checkpoint_is_refused(root, bad):
    coordinator, _, _ = _coordinator(1.0)
    coordinator.save_checkpoint(f"{root}/step=1.ckpt", step=1)
    fs = fsspec.filesystem("memory")
    path = f"{root}/step=1.ckpt/checkpoint_manifest.json"
    manifest = json.loads(fs.cat_file(path))
    manifest["data_prefix"] = bad
    fs.pipe_file(path, json.dumps(manifest).encode())
    with pytest.raises(ManifestError, match=r"file path .* in the manifest"):
        CheckpointManifest.load(f"{root}/step=1.ckpt")


def test_generation_names():
    assert generation_name("a" * 32, None) == f"g-{'a' * 32}-new"
    name = generation_name("b" * 32, '"etag"')
    assert parse_generation(name) == ("b" * 32, name.rsplit("-", 1)[1]) and len(name.rsplit("-", 1)[1]) == 16
    assert parse_generation("model") is None and parse_generation(f"g-{'a' * 31}-new") is None


# --------------------------------------------------------------------------- saving, replacing, loading


def test_round_trip_layout_and_replacing_a_checkpoint(root):
    coordinator, model, extra = _coordinator(1.0)
    coordinator.save_checkpoint(f"{root}/last.ckpt", step=1)
    first = _generation(f"{root}/last.ckpt")
    assert first.endswith("-new")
    files = ["extra.json", "extra.safetensors.index.json", "extra-00001-of-00001.safetensors",
             "model.safetensors.index.json", "model-00001-of-00001.safetensors"]
    assert _objects(f"{root}/last.ckpt") == sorted(["checkpoint_manifest.json"] + [f"{first}/{f}" for f in files])
    extra.state = {"value": 2.0, "t": torch.full((4,), 2.0)}
    coordinator.save_checkpoint(f"{root}/last.ckpt", step=2)
    second = _generation(f"{root}/last.ckpt")
    # The replaced generation is gone; the new one's name says which manifest it replaced.
    assert second != first and not second.endswith("-new")
    assert _objects(f"{root}/last.ckpt") == sorted(["checkpoint_manifest.json"] + [f"{second}/{f}" for f in files])
    assert find_latest_checkpoint(root) == f"{root}/last.ckpt"
    fresh, fresh_model, fresh_extra = _coordinator(9.0)
    result = fresh.load_checkpoint(f"{root}/last.ckpt")
    assert result.manifest.step == 2 and result.path == f"{root}/last.ckpt"
    assert torch.equal(fresh_model.weight, model.weight) and torch.equal(fresh_extra.state["t"], torch.full((4,), 2.0))


def test_a_background_save_to_an_object_store(root):
    coordinator, model, _ = _coordinator(3.0, async_save=True)
    coordinator.save_checkpoint(f"{root}/step=3.ckpt", step=3)
    coordinator.wait()
    fresh, fresh_model, _ = _coordinator(9.0)
    fresh.load_checkpoint(find_latest_checkpoint(root))
    assert torch.equal(fresh_model.weight, model.weight)


def test_saving_over_something_that_is_not_a_checkpoint_is_refused(root):
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{root}/plain.ckpt", b"a torch.save file")
    fs.pipe_file(f"{root}/mixed.ckpt/notes.txt", b"mine")
    coordinator, _, _ = _coordinator(1.0)
    with pytest.raises(CheckpointError, match=r"an object \(a file\) of that name exists"):
        coordinator.save_checkpoint(f"{root}/plain.ckpt")
    with pytest.raises(CheckpointError, match=r"it holds objects lightning_sharing did not write \(notes.txt\)"):
        coordinator.save_checkpoint(f"{root}/mixed.ckpt")
    assert _objects(root) == ["mixed.ckpt/notes.txt", "plain.ckpt"]


def test_a_failure_after_the_manifest_put_keeps_the_committed_checkpoint(root, monkeypatch):
    coordinator, model, _ = _coordinator(1.0)
    monkeypatch.setenv(_faults.FAULTS_ENV, "commit:renamed@0:raise")
    _faults._hits.clear()
    with pytest.raises(CheckpointError, match="injected fault at commit:renamed"):
        coordinator.save_checkpoint(f"{root}/step=1.ckpt", step=1)
    monkeypatch.delenv(_faults.FAULTS_ENV)
    # The save reports the failure, but its put went through: abort() saw the manifest name the generation.
    fresh, fresh_model, _ = _coordinator(9.0)
    fresh.load_checkpoint(f"{root}/step=1.ckpt")
    assert torch.equal(fresh_model.weight, model.weight)


# --------------------------------------------------------------------------- leftovers and removal


def test_leftovers_of_interrupted_saves_are_deleted_by_later_saves_and_nothing_else_is(root):
    fs = fsspec.filesystem("memory")
    base = root
    coordinator, _, _ = _coordinator(1.0)
    coordinator.save_checkpoint(f"{root}/last.ckpt", step=1)
    committed = _generation(f"{root}/last.ckpt")
    client, key, _ = open_client(f"{root}/last.ckpt")
    _, version = client.get(f"{key}/checkpoint_manifest.json")
    crashed_first_save = generation_name(uuid.uuid4().hex, None)  # can never commit: a manifest exists now
    stale = generation_name(uuid.uuid4().hex, '"a manifest that is gone"')  # expected another manifest: dead
    in_progress = generation_name(uuid.uuid4().hex, version)  # a save replacing last.ckpt right now: kept
    for name in (crashed_first_save, stale, in_progress):
        fs.pipe_file(f"{base}/last.ckpt/{name}/model-00001-of-00001.safetensors", b"x")
    fs.pipe_file(f"{base}/step=7.ckpt/{crashed_first_save}/extra.json", b"{}")  # no manifest: an interrupted save
    fs.pipe_file(f"{base}/logs/events.txt", b"not ours")  # never touched
    coordinator.save_checkpoint(f"{root}/step=8.ckpt", step=8)
    assert {p.split("/")[0] for p in _objects(root)} == {"last.ckpt", "step=8.ckpt", "logs"}
    assert sorted(_generations(f"{root}/last.ckpt")) == sorted([committed, in_progress])
    assert _objects(f"{root}/logs") == ["events.txt"]
    # The next save of last.ckpt itself deletes every generation that can no longer be committed.
    coordinator.save_checkpoint(f"{root}/last.ckpt", step=9)
    assert _generations(f"{root}/last.ckpt") == [_generation(f"{root}/last.ckpt")]


@pytest.mark.parametrize("client", ["fsspec", "obstore"])
def test_every_rank_killed_mid_upload_leaves_only_uploads_and_the_next_save_aborts_all_of_them(s3, s3_prefix, client):
    # Both ranks killed while uploading into a generation that never got a finished object: S3 lists no prefix
    # for it, only its unfinished uploads, one per rank. Each of them must go, not just the first one found.
    bucket, key, _ = s3.split_path(s3_prefix)
    coordinator, _, _ = _coordinator(1.0, storage_options={"client": client})
    coordinator.save_checkpoint(f"s3://{s3_prefix}/step=2.ckpt", step=2)
    dead = generation_name(uuid.uuid4().hex, None)  # a first save of step=2.ckpt: can never commit now
    for rank in (0, 1):
        s3.call_s3("create_multipart_upload", Bucket=bucket,
                   Key=f"{key}/step=2.ckpt/{dead}/big/rank-{rank:05d}-00001-of-00001.safetensors")
    coordinator.save_checkpoint(f"s3://{s3_prefix}/step=2.ckpt", step=2)
    answer = s3.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key + "/")
    assert answer.get("Uploads", []) == []


def test_remove_checkpoint_deletes_the_manifest_first_and_refuses_what_is_not_a_checkpoint(root):
    fs = fsspec.filesystem("memory")
    base = root
    coordinator, _, _ = _coordinator(1.0)
    for step in (1, 2):
        coordinator.save_checkpoint(f"{root}/step={step}.ckpt", step=step)
    # An interrupted removal: the manifest is gone, the files are not. It is no checkpoint any more...
    fs.rm_file(f"{base}/step=2.ckpt/checkpoint_manifest.json")
    assert find_latest_checkpoint(root) == f"{root}/step=1.ckpt"
    with pytest.raises(ManifestError, match=r"checkpoint_manifest\.json is missing"):
        _coordinator(9.0)[0].load_checkpoint(f"{root}/step=2.ckpt")
    # ...and removing it again finishes the job.
    remove_checkpoint(f"{root}/step=2.ckpt")
    remove_checkpoint(f"{root}/step=1.ckpt")
    assert _objects(root) == [] and find_latest_checkpoint(root) is None
    fs.pipe_file(f"{base}/plain.ckpt", b"a torch.save file")
    remove_checkpoint(f"{root}/plain.ckpt")
    fs.pipe_file(f"{base}/data/train.csv", b"1,2")
    with pytest.raises(CheckpointError, match=r"refusing to remove .*/data: it is not a lightning_sharing checkpoint"):
        remove_checkpoint(f"{root}/data")
    assert _objects(root) == ["data/train.csv"]


# --------------------------------------------------------------------------- S3 specifics


@pytest.mark.parametrize("client", ["fsspec", "obstore"])
def test_s3_listing_caches_see_a_save_and_a_removal(s3, s3_prefix, client):
    # Lightning's ModelCheckpoint holds fsspec's (cached) S3FileSystem (get_filesystem: url_to_fs) and asks it
    # exists()/ls() on rank 0; the store's own client is another one, whichever it is.
    url = f"s3://{s3_prefix}"
    fs = fsspec.core.url_to_fs(url)[0]
    fs.pipe_file(f"{s3_prefix}/other.txt", b"x")
    fs.invalidate_cache()
    assert fs.ls(s3_prefix, detail=False) == [f"{s3_prefix}/other.txt"]  # the listing is now cached
    coordinator, _, _ = _coordinator(1.0, storage_options={"client": client})
    coordinator.save_checkpoint(f"{url}/step=1.ckpt", step=1)
    assert fs.exists(f"{url}/step=1.ckpt") and f"{s3_prefix}/step=1.ckpt" in fs.ls(s3_prefix, detail=False)
    remove_checkpoint(f"{url}/step=1.ckpt", {"client": client})
    assert not fs.exists(f"{url}/step=1.ckpt") and fs.ls(s3_prefix, detail=False) == [f"{s3_prefix}/other.txt"]


@pytest.mark.parametrize("client", ["fsspec", "obstore"])
def test_loading_many_small_tensors_from_s3_takes_few_requests(moto_server, s3_prefix, client):
    proxy = FaultProxy(moto_server.endpoint_url)
    try:
        options = {"endpoint_url": proxy.url, "client": client}
        state = {f"t{i:03d}": torch.full((16,), float(i)) for i in range(300)}
        holder = Holder(state)
        coordinator = CheckpointCoordinator([StateComponent("many", holder, SharingPattern.GLOBAL)],
                                            storage_options=options)
        coordinator.save_checkpoint(f"s3://{s3_prefix}/step=1.ckpt", step=1)
        before = len(proxy.requests)
        holder.state = {}
        coordinator.load_checkpoint(f"s3://{s3_prefix}/step=1.ckpt")
        assert all(torch.equal(holder.state[k], v) for k, v in state.items()) and holder.state.keys() == state.keys()
        gets = [path for method, path in proxy.requests[before:] if method == "GET" and "/g-" in path]
        # One GET per file (index and shard, 300 tensors in it), not one per tensor: reads go through readahead.
        assert len(gets) == 2, gets
    finally:
        proxy.close()


def test_the_command_line_verifies_an_s3_checkpoint_with_credentials_from_the_environment(s3_prefix):
    coordinator, _, _ = _coordinator(1.0)
    url = f"s3://{s3_prefix}/step=1.ckpt"
    coordinator.save_checkpoint(url, step=1)
    assert "AWS_ENDPOINT_URL" in os.environ  # the moto fixture's: the way a user points clients at a store
    done = subprocess.run([sys.executable, "-m", "lightning_sharing.cli", "verify", url], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith(f"OK: {url}: 2 components, 5 files")


def test_the_command_line_takes_storage_options_and_inspects_an_s3_checkpoint(moto_server, s3_prefix, capsys):
    from lightning_sharing.cli import main

    coordinator, _, _ = _coordinator(1.0)
    url = f"s3://{s3_prefix}/step=1.ckpt"
    coordinator.save_checkpoint(url, step=1)
    generation = _generation(url)
    proxy = FaultProxy(moto_server.endpoint_url)
    try:
        options = json.dumps({"endpoint_url": proxy.url})
        assert main(["verify", url, "--storage-options", options]) == 0
        assert proxy.count("GET", "checkpoint_manifest.json") == 1  # it went where the options said
        assert main(["inspect", url, "--storage-options", options]) == 0
    finally:
        proxy.close()
    out = capsys.readouterr().out
    assert f"files under {generation}/ (this save's generation on an object store)" in out
    with pytest.raises(SystemExit):
        main(["verify", url, "--storage-options", "[1, 2]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_a_filesystem_checkpoint_copied_to_an_object_store_loads_and_can_be_replaced_and_removed(root, tmp_path):
    coordinator, model, _ = _coordinator(1.0)
    coordinator.save_checkpoint(tmp_path / "last.ckpt", step=1)
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "last.ckpt"), f"{root}/last.ckpt", recursive=True)  # what `aws s3 cp --recursive` does
    copied = _objects(f"{root}/last.ckpt")
    assert "model-00001-of-00001.safetensors" in copied
    assert CheckpointManifest.load(f"{root}/last.ckpt").data_prefix is None
    fresh, fresh_model, _ = _coordinator(9.0)
    fresh.load_checkpoint(f"{root}/last.ckpt")
    assert torch.equal(fresh_model.weight, model.weight)
    # Replacing it deletes exactly the files its manifest listed, once the new manifest is in place.
    fresh.save_checkpoint(f"{root}/last.ckpt", step=2)
    generation = _generation(f"{root}/last.ckpt")
    assert all(path == "checkpoint_manifest.json" or path.startswith(f"{generation}/")
               for path in _objects(f"{root}/last.ckpt"))
    remove_checkpoint(f"{root}/last.ckpt")
    assert _objects(root) == []
