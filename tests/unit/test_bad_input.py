"""Refusals: damaged, tampered or foreign checkpoints, unsafe targets, and the strict loading rules.

Every refusal must be a ``CheckpointError`` whose message says what is wrong and where. Loading is a
collective, so the local error reaches the caller wrapped in ``DistributedCheckpointError`` (naming the
failing rank and the original error type); the original, specific error is its ``__cause__``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from support.statefuls import ValueState

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    ComponentDeclarationError,
    CorruptCheckpointError,
    DistributedCheckpointError,
    ManifestError,
    RNGState,
    StateComponent,
    TopologyMismatchError,
    find_latest_checkpoint,
)
from lightning_sharing.format.safetensors_io import file_checksum

MANIFEST = "checkpoint_manifest.json"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
LR = 0.25

# --------------------------------------------------------------------------- helpers



def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))


def make_objects(seed: int):
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def components(model, opt) -> list[StateComponent]:
    return [
        StateComponent("model", model, "replicated"),
        StateComponent("optimizer", opt, "replicated"),
        StateComponent("rng", RNGState(), "per_rank"),
    ]


# 8*8*4 + 8*4 = 288 bytes per layer: two model shards.
SHARD_SIZE = 288


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    model, opt = make_objects(0)
    path = tmp_path / "runs" / "step=10.ckpt"
    CheckpointCoordinator(components(model, opt), max_shard_size=SHARD_SIZE).save_checkpoint(path, step=10)
    assert (path / SHARD1).is_file() and (path / SHARD2).is_file() and (path / "optimizer.json").is_file()
    return path, model, opt


def fresh_coordinator(seed: int = 1, **kwargs):
    model, opt = make_objects(seed)
    return CheckpointCoordinator(components(model, opt), **kwargs), model, opt


def refused(fn, cause: type[BaseException], *substrings: str) -> CheckpointError:
    """Run ``fn``; it must raise a CheckpointError whose specific error is ``cause``, naming ``substrings``."""
    # The agreement step re-raises the specific type on every rank (combined with
    # DistributedCheckpointError), so ``except CorruptCheckpointError`` works for users.
    with pytest.raises(cause) as info:
        fn()
    err = info.value
    assert isinstance(err, CheckpointError)
    message = str(err)
    if isinstance(err, DistributedCheckpointError):
        assert "rank 0" in message and cause.__name__ in message, message
        assert set(err.failures) == {0}
    for text in substrings:
        assert text in message, f"{text!r} not in {message!r}"
    return err


def edit_manifest(path: Path, edit) -> None:
    data = json.loads((path / MANIFEST).read_text())
    edit(data)
    (path / MANIFEST).write_text(json.dumps(data, indent=2))


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- the baseline loads


def test_the_untouched_checkpoint_loads(saved):
    path, model, _ = saved
    coordinator, fresh_model, fresh_opt = fresh_coordinator()
    assert not same_tensors(model, fresh_model)
    result = coordinator.load_checkpoint(path)
    assert result.loaded == ["model", "optimizer", "rng"] and result.skipped == {}
    assert same_tensors(model, fresh_model)
    assert fresh_opt.param_groups[0]["lr"] == LR


def test_loading_through_a_symlinked_checkpoint_directory(saved):
    # ModelCheckpoint(save_last="link") makes last.ckpt a link to the real checkpoint directory.
    path, model, _ = saved
    link = path.parent / "last.ckpt"
    os.symlink(path.name, link, target_is_directory=True)
    coordinator, fresh_model, _ = fresh_coordinator()
    assert coordinator.load_checkpoint(link).loaded == ["model", "optimizer", "rng"]
    assert same_tensors(model, fresh_model)


# --------------------------------------------------------------------------- manifest


def test_missing_manifest(saved):
    path, _, _ = saved
    (path / MANIFEST).unlink()
    coordinator, fresh_model, _ = fresh_coordinator()
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    refused(lambda: coordinator.load_checkpoint(path), ManifestError,
            f"{MANIFEST} is missing", "not a complete lightning_sharing checkpoint", "find_latest_checkpoint")
    assert all(torch.equal(t, before[k]) for k, t in fresh_model.state_dict().items())


def test_missing_directory(tmp_path):
    coordinator, _, _ = fresh_coordinator()
    # A FileNotFoundError, as Lightning raises for a missing checkpoint file, and still a ManifestError.
    err = refused(lambda: coordinator.load_checkpoint(tmp_path / "nope.ckpt"), CheckpointNotFoundError,
                  "Checkpoint file not found: ", "nope.ckpt does not exist")
    assert isinstance(err, FileNotFoundError) and isinstance(err, ManifestError)


def test_unknown_format_version(saved):
    path, _, _ = saved
    edit_manifest(path, lambda m: m.update(format_version=99))
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), ManifestError,
            "format version 99 is not supported", "reads versions 1, 2", "upgrade lightning_sharing")


def test_format_version_1_still_loads(saved):
    """A checkpoint of format version 1 (no file stamps or origins) loads as before."""
    path, model, _ = saved

    def to_version_1(manifest):
        manifest["format_version"] = 1
        for component in manifest["components"].values():
            for entry in component["files"]:
                entry.pop("stamp", None)
                entry.pop("origin", None)

    edit_manifest(path, to_version_1)
    coordinator, loaded, _ = fresh_coordinator()
    coordinator.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_manifest_that_is_not_json(saved):
    path, _, _ = saved
    (path / MANIFEST).write_text('{"format": "lightning_sharing", ')
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), ManifestError, "is not valid JSON", "corrupt")


def test_manifest_of_another_format(saved):
    path, _, _ = saved
    edit_manifest(path, lambda m: m.update(format="something_else"))
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), ManifestError,
            "format is 'something_else'", "expected 'lightning_sharing'")


@pytest.mark.parametrize(
    ("bad_path", "words"),
    [
        (f"../{SHARD1}", "'..'"),
        (f"rng/../../{SHARD1}", "'..'"),
        ("/etc/passwd", "absolute"),
        (f"/tmp/{SHARD1}", "absolute"),
        ("C:/model.json", "absolute"),
        (f"./{SHARD1}", "normalised"),
    ],
)
def test_manifest_paths_must_stay_inside(saved, bad_path, words):
    path, _, _ = saved

    def edit(m):
        m["components"]["model"]["files"][0]["path"] = bad_path

    edit_manifest(path, edit)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), ManifestError, repr(bad_path), words)


# --------------------------------------------------------------------------- damaged files


def test_truncated_safetensors_file_names_file_and_component(saved):
    path, _, _ = saved
    size = (path / SHARD1).stat().st_size
    with open(path / SHARD1, "r+b") as handle:
        handle.truncate(size - 16)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'model'", f"file {SHARD1}", f"has {size - 16} bytes but the manifest records {size}",
            "truncated")


def test_truncated_json_file_names_file_and_component(saved):
    path, _, _ = saved
    data = (path / "optimizer.json").read_bytes()
    (path / "optimizer.json").write_bytes(data[: len(data) // 2])
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'optimizer'", "file optimizer.json", "truncated")


def test_missing_listed_file(saved):
    path, _, _ = saved
    (path / "rng" / "rank-00000.json").unlink()
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'rng'", "rng/rank-00000.json", "is missing")


def _flip_last_tensor_byte(path: Path) -> None:
    flip_byte(path / SHARD2, (path / SHARD2).stat().st_size - 1)  # inside the tensor data


def _flip_lr_digit(path: Path) -> None:
    data = (path / "optimizer.json").read_bytes()
    at = data.index(b'["lr",0.25]') + len(b'["lr",0.2')
    assert data[at:at + 1] == b"5"
    flip_byte(path / "optimizer.json", at)  # '5' -> '4': still valid JSON, lr 0.25 -> 0.24


def test_flipped_byte_in_safetensors_is_a_checksum_mismatch(saved):
    path, _, _ = saved
    _flip_last_tensor_byte(path)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'model'", f"file {SHARD2}", "has checksum xxh3_128:", "the manifest records", "corrupt")


def test_flipped_byte_in_json_is_a_checksum_mismatch(saved):
    path, _, _ = saved
    _flip_lr_digit(path)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'optimizer'", "file optimizer.json", "has checksum", "corrupt")


def test_size_only_verify_misses_a_flipped_byte(saved):
    """Documented limitation: ``verify="size"`` compares sizes only, so same-size corruption loads.

    A flipped byte inside tensor data silently changes one weight, and a flipped digit in a JSON file
    silently changes a hyper-parameter. Use the default ``verify="checksum"`` unless the storage is
    trusted.
    """
    path, model, _ = saved
    _flip_last_tensor_byte(path)
    _flip_lr_digit(path)
    coordinator, fresh_model, fresh_opt = fresh_coordinator()
    result = coordinator.load_checkpoint(path, verify="size")
    assert result.loaded == ["model", "optimizer", "rng"]
    differing = sum(int((t != model.state_dict()[k]).sum()) for k, t in fresh_model.state_dict().items())
    assert differing == 1  # exactly the flipped element
    assert fresh_opt.param_groups[0]["lr"] == 0.24
    # The coordinator-wide setting behaves the same.
    coordinator, _, fresh_opt = fresh_coordinator(verify="size")
    coordinator.load_checkpoint(path)
    assert fresh_opt.param_groups[0]["lr"] == 0.24


def test_size_only_verify_catches_truncation(saved):
    path, _, _ = saved
    size = (path / SHARD2).stat().st_size
    with open(path / SHARD2, "r+b") as handle:
        handle.truncate(size - 1)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path, verify="size"), CorruptCheckpointError,
            "component 'model'", f"file {SHARD2}", f"has {size - 1} bytes", "truncated")


def test_verify_mode_is_checked(saved):
    path, _, _ = saved
    coordinator, _, _ = fresh_coordinator()
    with pytest.raises(ComponentDeclarationError, match=r"verify='none' must be one of"):
        coordinator.load_checkpoint(path, verify="none")


# --------------------------------------------------------------------------- pickles, extra files, symlinks


class _Evil:
    """A pickle that, when loaded, creates ``marker`` (stand-in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Evil(marker))


def test_the_malicious_pickle_is_live(tmp_path):
    # Sanity check of the payload used below: unpickling it really does create its marker file.
    marker = tmp_path / "sanity-marker"
    handle = pickle.loads(evil_pickle(marker))
    handle.close()
    assert marker.exists()


def test_unlisted_pickle_is_refused(saved, tmp_path):
    path, _, _ = saved
    marker = tmp_path / "PWNED"
    (path / "evil.pt").write_bytes(evil_pickle(marker))
    coordinator, fresh_model, _ = fresh_coordinator()
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "files the manifest does not list", "evil.pt")
    assert not marker.exists()
    assert all(torch.equal(t, before[k]) for k, t in fresh_model.state_dict().items())


def test_listed_pickle_with_correct_checksum_is_refused(saved, tmp_path):
    path, _, _ = saved
    marker = tmp_path / "PWNED"
    (path / "model").mkdir()
    for rel in ("evil.pt", "model/evil.pt", "model.pt"):
        (path / rel).write_bytes(evil_pickle(marker))

    def edit(m):
        for rel in ("evil.pt", "model/evil.pt", "model.pt"):
            m["components"]["model"]["files"].append(
                {"path": rel, "size": (path / rel).stat().st_size, "checksum": file_checksum(path / rel), "rank": 0}
            )

    edit_manifest(path, edit)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'model' lists 'evil.pt'", "not a file lightning_sharing writes", "pickle")
    assert not marker.exists()


@pytest.mark.parametrize(("victim", "component", "words"), [
    (SHARD2, "model", "cannot be read"),
    ("optimizer.json", "optimizer", "not valid JSON"),
    ("rng/rank-00000-00001-of-*.safetensors", "rng", "cannot be read"),
])
def test_pickle_disguised_under_a_listed_name_is_never_unpickled(saved, tmp_path, victim, component, words):
    # The attacker replaces a listed file and fixes up its size and checksum in the manifest.
    path, _, _ = saved
    [victim] = [p.relative_to(path).as_posix() for p in path.glob(victim)]
    marker = tmp_path / "PWNED"
    (path / victim).write_bytes(evil_pickle(marker))

    def edit(m):
        for entry in m["components"][component]["files"]:
            if entry["path"] == victim:
                entry["size"] = (path / victim).stat().st_size
                entry["checksum"] = file_checksum(path / victim)

    edit_manifest(path, edit)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError, victim, words)
    assert not marker.exists()


def test_unlisted_file_is_refused(saved):
    path, _, _ = saved
    (path / "rng" / "notes.txt").write_text("hello")
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "files the manifest does not list", "rng/notes.txt", "remove the extra files")


def test_unlisted_symlink_pointing_outside_is_refused(saved, tmp_path):
    path, _, _ = saved
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"secret")
    os.symlink(outside, path / "extra.safetensors")
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "files the manifest does not list", "extra.safetensors")


def test_listed_file_replaced_by_symlink_outside_is_refused(saved, tmp_path):
    # Same bytes (so size and checksum match), but the file now lives outside the checkpoint.
    path, _, _ = saved
    outside = tmp_path / "copy.safetensors"
    shutil.copyfile(path / SHARD1, outside)
    (path / SHARD1).unlink()
    os.symlink(outside, path / SHARD1)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "component 'model'", f"file {SHARD1}", "symbolic link")


def test_directory_replaced_by_symlink_outside_is_refused(saved, tmp_path):
    path, _, _ = saved
    outside = tmp_path / "rng-elsewhere"
    shutil.move(path / "rng", outside)
    os.symlink(outside, path / "rng", target_is_directory=True)
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), CorruptCheckpointError,
            "files the manifest does not list: ['rng']")


# --------------------------------------------------------------------------- find_latest_checkpoint


def _save_counter(path: Path, value: int, step: int | None = None) -> Path:
    CheckpointCoordinator([StateComponent("counter", ValueState(value), "global")]).save_checkpoint(path, step=step)
    return path


@pytest.mark.parametrize("record_step", [True, False], ids=["step-in-manifest", "step-from-name"])
def test_find_latest_checkpoint_by_step_not_mtime(tmp_path, record_step):
    root = tmp_path / "ckpts"
    steps = {}
    for step in (20, 100, 5):  # step=5 is written last (newest mtime)
        steps[step] = _save_counter(root / f"step={step}.ckpt", step, step if record_step else None)
    (steps[100] / MANIFEST).unlink()  # an interrupted save: no manifest, not complete
    future = os.path.getmtime(steps[20]) + 3600
    os.utime(steps[5], (future, future))
    assert find_latest_checkpoint(root) == steps[20]
    assert find_latest_checkpoint(str(root)) == steps[20]


def test_find_latest_checkpoint_ignores_hidden_staging_and_broken(tmp_path):
    root = tmp_path / "ckpts"
    _save_counter(root / "step=5.ckpt", 5, 5)
    best = _save_counter(root / "step=20.ckpt", 20, 20)
    # A complete-looking checkpoint with a higher step, but hidden (a staging leftover): ignored.
    shutil.copytree(best, root / f".step=500.ckpt.staging-{'a' * 32}")
    edit_manifest(root / f".step=500.ckpt.staging-{'a' * 32}", lambda m: m.update(step=500))
    shutil.copytree(best, root / ".hidden=900.ckpt")
    # A checkpoint whose manifest is garbage: ignored.
    shutil.copytree(best, root / "step=800.ckpt")
    (root / "step=800.ckpt" / MANIFEST).write_text("{not json")
    # A plain file with a step-like name: ignored.
    (root / "step=999.txt").write_text("x")
    assert find_latest_checkpoint(root) == best


def test_find_latest_checkpoint_prefers_the_recorded_step(tmp_path):
    root = tmp_path / "ckpts"
    _save_counter(root / "step=20.ckpt", 20, 20)
    last = _save_counter(root / "last.ckpt", 50, 50)  # no step in the name; the manifest has it
    assert find_latest_checkpoint(root) == last


def test_find_latest_checkpoint_nothing_there(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert find_latest_checkpoint(tmp_path / "empty") is None
    (tmp_path / "empty" / "step=3.ckpt").mkdir()  # incomplete: no manifest
    (tmp_path / f".step=4.ckpt.staging-{'b' * 32}").mkdir()
    assert find_latest_checkpoint(tmp_path / "empty") is None
    (tmp_path / "a_file").write_text("x")
    assert find_latest_checkpoint(tmp_path / "a_file") is None


# --------------------------------------------------------------------------- saving over things


def _load_counter(path: Path) -> int:
    holder = ValueState(-1)
    CheckpointCoordinator([StateComponent("counter", holder, "global")]).load_checkpoint(path)
    return holder.value


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    target = tmp_path / "last.ckpt"
    _save_counter(target, 1)
    assert _load_counter(target) == 1
    _save_counter(target, 2)
    assert _load_counter(target) == 2
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # no staging or replaced leftovers
    assert sorted(os.listdir(target)) == [MANIFEST, "counter.json"]


def test_saving_over_a_symlinked_last_replaces_the_link_only(tmp_path):
    real = _save_counter(tmp_path / "step=1.ckpt", 1)
    link = tmp_path / "last.ckpt"
    os.symlink(real, link, target_is_directory=True)
    _save_counter(link, 2)
    assert not link.is_symlink() and link.is_dir()
    assert _load_counter(link) == 2
    assert _load_counter(real) == 1


def test_stale_staging_directories_are_removed_by_the_next_save(tmp_path):
    stale = [tmp_path / f".last.ckpt.staging-{'0123456789abcdef' * 2}",
             tmp_path / f".step=7.ckpt.staging-{'f' * 32}"]
    for directory in stale:
        directory.mkdir()
        (directory / "model-00001-of-00001.safetensors").write_bytes(b"partial")
    kept = [tmp_path / ".last.ckpt.staging-notahexstring", tmp_path / ".keep", tmp_path / "other"]
    for directory in kept:
        directory.mkdir()
    _save_counter(tmp_path / "last.ckpt", 3)
    for directory in stale:
        assert not directory.exists(), directory
    for directory in kept:
        assert directory.exists(), directory
    assert _load_counter(tmp_path / "last.ckpt") == 3


def test_interrupted_replace_is_repaired_by_the_next_save(tmp_path):
    # A crash between the two renames of a non-atomic replace leaves the old checkpoint under
    # ".<name>.replaced-<token>" and no "<name>"; the next save puts it back.
    old = _save_counter(tmp_path / "step=1.ckpt", 1)
    os.rename(old, tmp_path / f".step=1.ckpt.replaced-{'c' * 32}")
    _save_counter(tmp_path / "step=2.ckpt", 2)
    assert _load_counter(tmp_path / "step=1.ckpt") == 1
    assert sorted(os.listdir(tmp_path)) == ["step=1.ckpt", "step=2.ckpt"]


def test_saving_over_a_non_checkpoint_directory_is_refused_and_leaves_it_untouched(tmp_path):
    target = tmp_path / "important"
    (target / "sub").mkdir(parents=True)
    (target / "thesis.tex").write_text("years of work")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = snapshot(target)
    refused(lambda: _save_counter(target, 1), CheckpointError,
            "refusing to replace", "important", "not a lightning_sharing checkpoint")
    assert snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["important"]  # the staging directory was cleaned up


def test_saving_over_a_regular_file_is_refused(tmp_path):
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"an old torch.save checkpoint")
    refused(lambda: _save_counter(target, 1), CheckpointError, "refusing to replace")
    assert target.read_bytes() == b"an old torch.save checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt"]


def test_saving_into_an_empty_directory_is_allowed(tmp_path):
    (tmp_path / "empty.ckpt").mkdir()
    _save_counter(tmp_path / "empty.ckpt", 4)
    assert _load_counter(tmp_path / "empty.ckpt") == 4


# --------------------------------------------------------------------------- strict loading rules


@pytest.fixture
def model_and_counter(tmp_path) -> tuple[Path, torch.nn.Module]:
    model = make_model(0)
    path = tmp_path / "s.ckpt"
    CheckpointCoordinator([
        StateComponent("model", model, "replicated"),
        StateComponent("counter", ValueState(7), "replicated"),
    ]).save_checkpoint(path)
    return path, model


def test_missing_required_component(model_and_counter):
    path, model = model_and_counter
    fresh = make_model(1)
    extra = ValueState(5)
    declared = [StateComponent("model", fresh, "replicated"), StateComponent("counter", ValueState(), "replicated"),
                StateComponent("extra", extra, "global")]
    refused(lambda: CheckpointCoordinator(declared).load_checkpoint(path), ComponentDeclarationError,
            "required component 'extra' is not in the checkpoint", "['counter', 'model']", "required=False")
    assert not same_tensors(fresh, model)  # a refused load changes nothing
    result = CheckpointCoordinator(declared).load_checkpoint(path, strict=False)
    assert result.loaded == ["model", "counter"]
    assert result.skipped == {"extra": "not in the checkpoint"}
    assert same_tensors(fresh, model) and extra.value == 5


def test_missing_optional_component_is_skipped(model_and_counter):
    path, model = model_and_counter
    fresh, counter, extra = make_model(1), ValueState(), ValueState(5)
    result = CheckpointCoordinator([
        StateComponent("model", fresh, "replicated"),
        StateComponent("counter", counter, "replicated"),
        StateComponent("extra", extra, "global", required=False),
    ]).load_checkpoint(path, strict=True)
    assert result.loaded == ["model", "counter"]
    assert result.skipped == {"extra": "not in the checkpoint"}
    assert same_tensors(fresh, model) and counter.value == 7 and extra.value == 5


def test_undeclared_component_in_the_checkpoint(model_and_counter):
    path, model = model_and_counter
    fresh = make_model(1)
    coordinator = CheckpointCoordinator([StateComponent("model", fresh, "replicated")])
    refused(lambda: coordinator.load_checkpoint(path), ComponentDeclarationError,
            "holds components ['counter'] that are not declared", "strict=False")
    assert not same_tensors(fresh, model)
    result = coordinator.load_checkpoint(path, strict=False)
    assert result.loaded == ["model"]
    assert result.skipped == {"counter": "in the checkpoint but not declared"}
    assert same_tensors(fresh, model)
    # Left out on purpose: a strict load of the model alone, with nothing reported about the counter.
    again = make_model(1)
    result = CheckpointCoordinator([StateComponent("model", again, "replicated")]).load_checkpoint(
        path, ignore={"counter"})
    assert result.loaded == ["model"] and result.skipped == {}
    assert same_tensors(again, model)


def test_pattern_change(model_and_counter):
    path, model = model_and_counter
    fresh, counter = make_model(1), ValueState(-3)
    declared = [StateComponent("model", fresh, "replicated"), StateComponent("counter", counter, "global")]
    refused(lambda: CheckpointCoordinator(declared).load_checkpoint(path), ComponentDeclarationError,
            "component 'counter'", "saved as REPLICATED but is declared GLOBAL")
    assert counter.value == -3 and not same_tensors(fresh, model)
    result = CheckpointCoordinator(declared).load_checkpoint(path, strict=False)
    assert result.loaded == ["model"]
    assert list(result.skipped) == ["counter"]
    assert "saved as REPLICATED but is declared GLOBAL" in result.skipped["counter"]
    assert counter.value == -3 and same_tensors(fresh, model)


def test_replicated_copy_read_by_a_sharded_declaration_and_back(model_and_counter, tmp_path):
    # Both hold each value once: the saved pattern is read as it was saved (a DDP checkpoint into FSDP2, say).
    path, model = model_and_counter
    fresh = make_model(1)
    sharded = CheckpointCoordinator([StateComponent("model", fresh, "sharded")])
    result = sharded.load_checkpoint(path, ignore={"counter"})
    assert result.loaded == ["model"] and result.skipped == {} and same_tensors(fresh, model)
    sharded.save_checkpoint(tmp_path / "sharded.ckpt")
    back = make_model(2)
    CheckpointCoordinator([StateComponent("model", back, "replicated")]).load_checkpoint(tmp_path / "sharded.ckpt")
    assert same_tensors(back, model)


def test_group_change(tmp_path):
    path = tmp_path / "g.ckpt"
    CheckpointCoordinator([StateComponent("loader", ValueState(1), "per_group", process_group_name="dp")],
                          process_groups={"dp": None}).save_checkpoint(path)
    assert os.path.isfile(path / "loader" / "dp-00000.json")
    holder = ValueState(0)
    coordinator = CheckpointCoordinator([StateComponent("loader", holder, "per_group", process_group_name="tp")],
                                        process_groups={"tp": None})
    refused(lambda: coordinator.load_checkpoint(path), ComponentDeclarationError,
            "saved for group 'dp' but is declared for group 'tp'")
    assert coordinator.load_checkpoint(path, strict=False).skipped.keys() == {"loader"}
    assert holder.value == 0


def test_per_rank_state_from_another_world_size(saved):
    # Pretend the checkpoint was written by 2 ranks on one node (edit the recorded topology).
    path, _, _ = saved
    edit_manifest(path, lambda m: m.update(world_size=2, topology={"world_size": 2, "nodes": [[0, 1]], "groups": {}}))
    coordinator, _, _ = fresh_coordinator()
    refused(lambda: coordinator.load_checkpoint(path), TopologyMismatchError,
            "component 'rng' is PER_RANK", "saved at world_size=2", "this run has world_size=1",
            "Saved topology: world_size=2", "current topology: world_size=1")
    result = coordinator.load_checkpoint(path, strict=False)
    assert result.loaded == ["model", "optimizer"]  # REPLICATED state loads at any world size
    assert list(result.skipped) == ["rng"] and "topology changed" in result.skipped["rng"]


def test_staging_and_removal_names_carry_no_checkpoint_name(tmp_path: Path) -> None:
    # Lightning's SLURM auto-resume reads digits out of any name containing "hpc_ckpt_": a leftover of an
    # interrupted save of hpc_ckpt_3.ckpt must not look like version 3 (or 30123...).
    from lightning_sharing.storage.local import remove_checkpoint, remove_stale_staging, staging_path

    staging = staging_path(tmp_path / "hpc_ckpt_3.ckpt", "0123456789abcdef" * 2)
    assert staging.parent == tmp_path and staging.name == ".staging-0123456789abcdef0123456789abcdef"
    staging.mkdir()
    (tmp_path / "hpc_ckpt_2.ckpt").mkdir()
    remove_checkpoint(tmp_path / "hpc_ckpt_2.ckpt")
    assert remove_stale_staging(tmp_path) == [staging]
    assert list(tmp_path.iterdir()) == []
