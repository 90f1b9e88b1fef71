"""``load_hf_weights`` in one process: files ``save_pretrained`` and the export write, into a plain module; missing,
unexpected and mismatched keys (errors naming them, or lists); dtype casts; a URL; the Hugging Face cache's links;
malformed files. FSDP2, DDP and tensor parallel run on two processes in tests/distributed/test_hf_roundtrip.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from support.hf import SKIP_REASON, Wrapper, gpt2, logits, train_step

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    SharingPattern,
    StateComponent,
    export_checkpoint,
    load_hf_weights,
)
from lightning_sharing.engine.hf_files import open_hf_files, read_hf_directory
from lightning_sharing.sharded.load import ReadPlan, plan_box, read_chunks

pytest.importorskip("transformers", reason=SKIP_REASON)
KEYS = 29  # GPT-2's state dict: lm_head.weight is the embedding, under a second name


def _pretrained(tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    model = gpt2(seed)
    train_step(model, lambda ids: model(ids).logits)
    model.save_pretrained(tmp_path / "pretrained")  # one model.safetensors, lm_head left out (tied)
    return model, tmp_path / "pretrained"


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_files_save_pretrained_wrote_load_into_a_plain_module(tmp_path: Path) -> None:
    trained, path = _pretrained(tmp_path)
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors"]
    fresh = gpt2(seed=5)
    result = load_hf_weights(fresh, path)
    assert (len(result.loaded), result.missing, result.unexpected, result.mismatched) == (KEYS, [], [], [])
    assert "lm_head.weight" in result.loaded  # present through its tie with transformer.wte.weight
    assert torch.equal(logits(fresh), logits(trained))


def test_an_export_loads_under_a_prefix_of_the_module(tmp_path: Path) -> None:
    wrapper = Wrapper(seed=0)
    train_step(wrapper)
    CheckpointCoordinator([StateComponent("model", wrapper, SharingPattern.REPLICATED)]).save_checkpoint(
        tmp_path / "step=1.ckpt")
    export_checkpoint(tmp_path / "step=1.ckpt", tmp_path / "hf", max_shard_size=30_000)  # several shards, an index
    fresh = Wrapper(seed=3)
    probe = _state(fresh.probe)
    result = load_hf_weights(fresh, tmp_path / "hf", prefix="model.")
    assert len(result.loaded) == KEYS and all(name.startswith("model.") for name in result.loaded)
    assert torch.equal(logits(fresh), logits(wrapper))
    assert all(torch.equal(v, probe[k]) for k, v in fresh.probe.state_dict().items())  # outside the prefix


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def test_missing_and_unexpected_keys_are_named_or_listed(tmp_path: Path) -> None:
    trained = gpt2(seed=0)
    tensors = {k: v for k, v in trained.state_dict().items() if k not in ("lm_head.weight", "transformer.ln_f.bias")}
    tensors["score.weight"] = torch.ones(2, 32)
    path = _write(tmp_path / "hf", tensors)
    fresh = gpt2(seed=5)
    before = _state(fresh)
    with pytest.raises(CheckpointError) as raised:
        load_hf_weights(fresh, path)
    message = str(raised.value)
    assert "the files lack ['transformer.ln_f.bias']; the module lacks ['score.weight']" in message
    assert "strict=False" in message
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())  # nothing read before the check
    result = load_hf_weights(fresh, path, strict=False)
    assert (result.missing, result.unexpected, len(result.loaded)) == (["transformer.ln_f.bias"], ["score.weight"],
                                                                       KEYS - 1)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, before[name] if name == "transformer.ln_f.bias" else trained.state_dict()[name])


def test_a_shape_mismatch_is_named_or_listed(tmp_path: Path) -> None:
    tensors = dict(gpt2(seed=0).state_dict())
    del tensors["lm_head.weight"]
    tensors["transformer.wpe.weight"] = torch.zeros(31, 32)
    path = _write(tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match=r"transformer.wpe.weight: \[31, 32\] in the files, \[32, 32\] in the "
                                              r"module"):
        load_hf_weights(gpt2(seed=5), path)
    result = load_hf_weights(gpt2(seed=5), path, strict=False)
    assert (result.mismatched, result.missing, result.unexpected) == (["transformer.wpe.weight"], [], [])


def test_a_bfloat16_file_is_cast_to_the_module_dtype(tmp_path: Path) -> None:
    trained = gpt2(seed=0)
    path = _write(tmp_path / "hf", {k: v.to(torch.bfloat16) for k, v in trained.state_dict().items()
                                    if k != "lm_head.weight"})
    fresh = gpt2(seed=5)
    load_hf_weights(fresh, path)
    for name, value in fresh.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, trained.state_dict()[name].to(torch.bfloat16).float()), name


def test_a_url_and_the_hugging_face_cache_links(tmp_path: Path) -> None:
    import fsspec

    trained, path = _pretrained(tmp_path)
    memory = fsspec.filesystem("memory")
    for name in os.listdir(path):
        memory.pipe(f"/hf-test-bucket/gpt2/{name}", (path / name).read_bytes())
    try:
        fresh = gpt2(seed=5)
        load_hf_weights(fresh, "memory://hf-test-bucket/gpt2")
        assert torch.equal(logits(fresh), logits(trained))
    finally:
        memory.rm("/hf-test-bucket", recursive=True)
    # A snapshot of the Hugging Face cache: every file a symbolic link into blobs/.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snapshot").mkdir()
    for name in os.listdir(path):
        (tmp_path / "blobs" / name).write_bytes((path / name).read_bytes())
        (tmp_path / "snapshot" / name).symlink_to(tmp_path / "blobs" / name)
    fresh = gpt2(seed=6)
    load_hf_weights(fresh, tmp_path / "snapshot")
    assert torch.equal(logits(fresh), logits(trained))


def test_malformed_directories_are_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"holds neither model\.safetensors\.index\.json nor"):
        load_hf_weights(gpt2(), tmp_path / "empty")
    _, path = _pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight is on the meta device.*to_empty"):
        load_hf_weights(gpt2().to("meta"), path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])  # truncated
    with pytest.raises(CheckpointError, match=r"tensor '.*' in .*/model.safetensors: bytes .* do not hold shape"):
        load_hf_weights(gpt2(), path)
    (path / "model.safetensors.index.json").write_text('{"weight_map": {"transformer.wte.weight": "../x.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"names '../x.safetensors', which is not a .safetensors file inside"):
        load_hf_weights(gpt2(), path)


def test_the_reader_reads_files_without_digests_only_when_told(tmp_path: Path) -> None:
    trained, path = _pretrained(tmp_path)
    files = open_hf_files(path)
    try:
        index = read_hf_directory(files, str(path))
        record = index.tensors["transformer.wpe.weight"]
        target = torch.empty(record.shape)
        read = plan_box("transformer.wpe.weight", record, record.chunks[0].box, target)
        with pytest.raises(CorruptCheckpointError, match="records no block digests, so its bytes cannot be verified"):
            read_chunks(ReadPlan((read,)), index, files)
        read_chunks(ReadPlan((read,)), index, files, verified=False)
    finally:
        files.close()
    assert torch.equal(target, trained.transformer.wpe.weight)
