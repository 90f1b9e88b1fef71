"""The codec (state dict <-> tensors + JSON, no pickle) and the on-disk format, single process."""

from __future__ import annotations

import copy
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lightning_sharing import (
    CheckpointCoordinator,
    CheckpointError,
    CheckpointManifest,
    RNGState,
    SharingPattern,
    StateComponent,
    UnsupportedStateError,
)
from lightning_sharing.core.options import CheckpointOptions
from lightning_sharing.engine.formats import format_for
from lightning_sharing.engine.whole_format import plan_copy
from lightning_sharing.format.codec import decode_state, encode_state, is_flat_tensor_dict
from lightning_sharing.format.copy_files import read_payload
from lightning_sharing.format.safetensors_io import read_tensor_file
from lightning_sharing.storage import LocalStore

# --------------------------------------------------------------------------- helpers

ALL_DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,  # AMD's float8: safetensors names them F8_E4M3FNUZ / F8_E5M2FNUZ
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so NaN and float8 compare exactly)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if (a.dtype.is_floating_point and a.dtype.itemsize == 1) or a.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.equal(_bits(a), _bits(b))
    return torch.equal(a, b)


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Deep equality that also checks container and scalar types (tuple stays tuple, int keys stay int)."""
    assert type(a) is type(b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)), \
        f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert tensor_equal(a, b), f"{path}: tensor values differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), f"{path}: array values differ"
    elif isinstance(a, dict):
        assert len(a) == len(b), f"{path}: keys {list(a)} != {list(b)}"
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{path} key {ka!r}")
            assert_same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (va, vb) in enumerate(zip(a, b, strict=True)):
            assert_same(va, vb, f"{path}[{i}]")
    elif isinstance(a, float):
        assert repr(a) == repr(b), f"{path}: {a!r} != {b!r}"  # repr: nan == nan, -0.0 != 0.0
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def json_round_trip(state: Any) -> Any:
    """encode -> real JSON text (as the payload writer does: no NaN literals) -> decode, in memory."""
    enc = encode_state(state, "test")
    tree = json.loads(json.dumps(enc.tree, allow_nan=False))
    ties = json.loads(json.dumps(enc.ties))
    tensors = {k: v.clone() for k, v in enc.tensors.items()}
    return decode_state(tree, tensors, ties, flat=enc.flat)


def disk_round_trip(state: Any, root: Path, stem: str = "comp", max_shard_size: int = 10**9) -> Any:
    """encode -> safetensors shards + JSON files on disk -> read back -> decode."""
    enc = encode_state(state, stem)
    plan = plan_copy(stem, enc, (0,), 0, 0, CheckpointOptions(max_shard_size=max_shard_size))
    entries = format_for("global").write(LocalStore(), str(root), plan, rank=0).files
    checksums = {e.path: e.checksum for e in entries}
    return read_payload(stem, set(checksums), lambda rel: (root / rel).read_bytes(),
                        lambda rel: read_tensor_file(root / rel, checksums[rel]), enc.flat)


def round_trips(state: Any, root: Path) -> list[Any]:
    return [json_round_trip(state), disk_round_trip(state, root)]


# --------------------------------------------------------------------------- codec round trips


def test_module_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    model(torch.randn(5, 4))  # BatchNorm running stats and num_batches_tracked (int64 0-dim) change
    state = model.state_dict()
    assert is_flat_tensor_dict(state)
    enc = encode_state(state)
    assert enc.flat and enc.tree is None and list(enc.tensors) == list(state)
    for out in round_trips(state, tmp_path):
        assert set(out) == set(state)  # safetensors files do not keep insertion order
        for name, tensor in state.items():
            assert torch.equal(out[name], tensor), name
            assert out[name].dtype == tensor.dtype
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
        fresh.load_state_dict(out)
        for name, tensor in fresh.state_dict().items():
            assert torch.equal(tensor, state[name]), name


def _train_adamw(steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    for _ in range(steps):
        model(torch.randn(6, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_adamw_state_dict_round_trip(tmp_path):
    model, opt = _train_adamw(2)
    state = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(model.state_dict())
    # The features this test is about are really there.
    assert sorted(state["state"]) == [0, 1, 2, 3]
    assert state["param_groups"][0]["betas"] == (0.8, 0.95)
    assert state["param_groups"][0]["foreach"] is None
    assert state["state"][0]["step"].dim() == 0
    for out in round_trips(state, tmp_path):
        assert_same(state, out)
        assert isinstance(out["param_groups"][0]["betas"], tuple)
        assert all(isinstance(k, int) for k in out["state"])
        # A fresh optimizer loaded from the decoded state takes the same next step as one loaded from
        # the original state.
        x = torch.randn(6, 3)
        results = []
        for opt_state in (copy.deepcopy(state), out):
            m, _ = _train_adamw(0)
            m.load_state_dict(weights)
            o = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.8, 0.95))
            o.load_state_dict(opt_state)
            m(x).pow(2).mean().backward()
            o.step()
            results.append(m.state_dict())
        for name, tensor in results[0].items():
            assert torch.equal(tensor, results[1][name]), name
        assert not torch.equal(results[0]["0.weight"], weights["0.weight"])  # the step did something


def test_nested_containers_round_trip(tmp_path):
    state = {
        "ints": {0: "zero", 1: [1, 2, 3], -7: None, 2**70: "big"},
        "mixed_keys": {1: "int one", "1": "str one", (1, "a"): "tuple key", None: "none key", 2.5: "float key",
                       False: "bool key"},
        "nested": [1, (2, [3, (4, {"five": 5})]), [], (), {}],
        "tuple_of_tensors": (torch.arange(3), torch.ones(2, 2)),
        "list_of_dicts": [{"a": torch.zeros(1)}, {"a": torch.zeros(1) + 1}],
        "tag_lookalikes": {"__tensor__": "not a tensor", "__tuple__": ["x"], "__float__": "nan", "__dict__": 1},
        "single_tag_dict": {"__bytes__": "AAAA"},
        "strings": ["", "ünïcødé", "a\x00b", "line\nbreak"],
        "scalars": [True, False, 0, -1, 1.5, None],
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
    }
    for out in round_trips(state, tmp_path):
        assert_same(state, out)
        assert list(out["mixed_keys"]) == [1, "1", (1, "a"), None, 2.5, False]
        assert type(list(out["mixed_keys"])[-1]) is bool


def test_colliding_tensor_names_round_trip(tmp_path):
    # Tensor names derive from paths; "x" -> "a" and "x.a" both become "state.x.a" and must not clash.
    state = {"x": {"a": torch.tensor([1.0])}, "x.a": torch.tensor([2.0]), "x.a~1": torch.tensor([3.0])}
    for out in round_trips(state, tmp_path):
        assert_same(state, out)


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, 5e-324, 0.1 + 0.2, -1.5e-300]
)
def test_special_floats_round_trip(tmp_path, value):
    state = {"v": value, "in_list": [value, 1.0], "as_key": {value: "x"}}
    for out in round_trips(state, tmp_path):
        assert_same(state, out)


@pytest.mark.parametrize("value", [np.float64("nan"), np.float64("inf"), np.float64("-inf")])
def test_numpy_float64_special_values_round_trip(tmp_path, value):
    # np.float64 is a subclass of float, so it takes the float branch of the encoder; its NaN/inf
    # must still be stored in the form the decoder accepts ("nan"/"inf"/"-inf").
    state = {"best_score": value}
    for out in round_trips(state, tmp_path):
        assert repr(float(out["best_score"])) == repr(float(value))


class Metrics:
    def __init__(self, best: Any) -> None:
        self.best = best

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


def test_numpy_float64_nan_checkpoint_can_be_loaded(tmp_path):
    # np.mean([]) or a diverged loss gives np.float64('nan'): the save must not write a checkpoint that
    # cannot be loaded.
    CheckpointCoordinator([StateComponent("metrics", Metrics(np.float64("nan")), "global")]).save_checkpoint(
        tmp_path / "m.ckpt")
    metrics = Metrics(0.0)
    CheckpointCoordinator([StateComponent("metrics", metrics, "global")]).load_checkpoint(tmp_path / "m.ckpt")
    assert math.isnan(metrics.best)


def test_numpy_scalars_become_python_scalars(tmp_path):
    state = {"i": np.int64(7), "f": np.float32(1.5), "b": np.bool_(True), "u": np.uint8(255)}
    for out in round_trips(state, tmp_path):
        assert out == {"i": 7, "f": 1.5, "b": True, "u": 255}
        assert [type(v) for v in out.values()] == [int, float, bool, int]


def test_bytes_round_trip(tmp_path):
    state = {"empty": b"", "binary": bytes(range(256)), "nested": [b"\x80\x04pickle-looking", (b"x",)]}
    for out in round_trips(state, tmp_path):
        assert_same(state, out)


def test_numpy_arrays_round_trip(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    state = {
        "f32": base,
        "f64": np.linspace(0, 1, 5),
        "f16": np.array([1.5, -2.0, np.nan], dtype=np.float16),
        "i64": np.array([-(2**62), 0, 2**62], dtype=np.int64),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u8": np.array([0, 255], dtype=np.uint8),
        "u32": np.array([2**32 - 1], dtype=np.uint32),
        "bool": np.array([True, False, True]),
        "zero_dim": np.array(3.25),
        "empty": np.zeros((0, 4), dtype=np.int32),
        "strided_view": base[:, ::2],
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
    }
    for out in round_trips(state, tmp_path):
        assert_same(state, out)
        assert all(isinstance(v, np.ndarray) for v in out.values())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_round_trips(tmp_path, dtype):
    source = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [1, 0, 1, 0]], dtype=torch.float32)
    if dtype is torch.bool:
        full = source > 1
    elif dtype.is_floating_point:
        full = (source * 0.5 - 1).to(dtype)
    else:
        full = source.to(dtype)
    state = {
        "matrix": full,
        "zero_dim": full[1, 1].clone(),
        "empty": full[:0],
        "empty_2d": torch.zeros((0, 5), dtype=dtype),
        "transposed": full.t(),  # non-contiguous view of "matrix"'s memory
        "strided": full[:, ::2],
        "offset_view": full[1:],
        "note": "a non-tensor value makes this a tree, not a flat tensor dict",
    }
    assert not state["transposed"].is_contiguous() and not state["strided"].is_contiguous()
    assert state["zero_dim"].dim() == 0
    for out in round_trips(state, tmp_path):
        assert_same(state, out)
        assert out["zero_dim"].dim() == 0
    # The same tensors as a flat (module-like) state dict.
    flat = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    out = disk_round_trip(flat, tmp_path / "flat", "flat")
    assert set(out) == set(flat)
    for name, tensor in flat.items():
        assert tensor_equal(out[name], tensor), name
    # What we write, the safetensors library itself reads (float8 fnuz included).
    by_safetensors = safetensors.torch.load_file(tmp_path / "flat" / "flat-00001-of-00001.safetensors")
    assert set(by_safetensors) == set(flat)
    for name, tensor in flat.items():
        assert tensor_equal(by_safetensors[name], tensor), name


def test_non_contiguous_and_expanded_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "t": base.t(),
        "expanded": torch.arange(4.0).reshape(1, 4).expand(3, 4),  # stride 0
        "step": base[::2, 1::2],
        "channels_last": torch.arange(24.0).reshape(1, 2, 3, 4).to(memory_format=torch.channels_last),
        "note": "a non-tensor value makes this a tree",
    }
    for out in round_trips(state, tmp_path):
        assert_same(state, out)


def test_tied_tensors_in_a_tree_stay_tied(tmp_path):
    shared = torch.randn(3, 3)
    state = {"a": shared, "b": [shared], "other": shared.clone()}
    enc = encode_state(state)
    assert len(enc.tensors) == 2 and len(enc.ties) == 1
    for out in round_trips(state, tmp_path):
        assert out["a"] is out["b"][0]
        assert out["other"] is not out["a"]
        assert torch.equal(out["a"], shared) and torch.equal(out["other"], shared)


class Custom:
    pass


@pytest.mark.parametrize(
    ("state", "path", "type_name"),
    [
        ({"fn": lambda x: x}, "state['fn']", "builtins.function"),
        ({"layers": [0, {"obj": Custom()}]}, "state['layers'][1]['obj']", "test_codec_and_format.Custom"),
        ({"s": {1, 2}}, "state['s']", "builtins.set"),
        ({"c": 1 + 2j}, "state['c']", "builtins.complex"),
        ({"t": (1, object())}, "state['t'][1]", "builtins.object"),
    ],
)
def test_unsupported_values_are_refused_with_their_path(state, path, type_name):
    with pytest.raises(UnsupportedStateError) as info:
        encode_state(state, "my_component")
    message = str(info.value)
    assert "'my_component'" in message
    assert path in message
    assert type_name in message
    assert "without pickle" in message


def test_unsupported_tensors_are_refused_with_their_path():
    with pytest.raises(UnsupportedStateError, match=r"state\['z'\] is complex .*view_as_real"):
        encode_state({"z": torch.zeros(2, dtype=torch.complex64)}, "c")
    with pytest.raises(UnsupportedStateError, match=r"state\['sp'\] has layout torch.sparse_coo.*to_dense"):
        encode_state({"sp": torch.eye(2).to_sparse()}, "c")


@pytest.mark.parametrize(
    "array", [np.array([object()], dtype=object), np.array(["abc", "de"]), np.array(["2020-01-01"], dtype="M8[D]")],
    ids=["object", "unicode", "datetime64"],
)
def test_unsupported_numpy_arrays_are_refused_as_unsupported_state(array):
    # A numpy array of Python objects or strings cannot be stored as a tensor; the refusal must be the
    # package's UnsupportedStateError naming the path, not a bare TypeError from torch.from_numpy.
    with pytest.raises(UnsupportedStateError, match=r"state\['arr'\]"):
        encode_state({"arr": array}, "c")


def test_big_endian_numpy_array_is_stored_or_refused_cleanly(tmp_path):
    # Arrays read from files (e.g. np.frombuffer(..., ">f4")) can be big-endian. Either keep the values
    # (in native byte order) or refuse with UnsupportedStateError naming the path; never a bare error.
    array = np.arange(4, dtype=">f4")
    try:
        outs = round_trips({"arr": array}, tmp_path)
    except UnsupportedStateError as exc:
        assert "state['arr']" in str(exc)
        return
    for out in outs:
        assert isinstance(out["arr"], np.ndarray) and out["arr"].dtype.kind == "f"
        assert np.array_equal(out["arr"], array)


# --------------------------------------------------------------------------- through the coordinator


def hf_load(checkpoint: Path, key: str = "model") -> dict[str, torch.Tensor]:
    """Load a sharded model the way a Hugging Face user would: json + safetensors only."""
    with open(checkpoint / f"{key}.safetensors.index.json") as handle:
        index = json.load(handle)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(checkpoint / file)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_hf_sharded_layout_loads_without_lightning_sharing(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(3)])
    # 32*32*4 + 32*4 = 4224 bytes per layer: exactly one layer per shard.
    coordinator = CheckpointCoordinator([StateComponent("model", model, "replicated")], max_shard_size=4224)
    ckpt = Path(coordinator.save_checkpoint(tmp_path / "step=1.ckpt"))
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files_under(ckpt) == {"checkpoint_manifest.json", "model.safetensors.index.json", *shards}

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "0.weight": shards[0], "0.bias": shards[0],
        "1.weight": shards[1], "1.bias": shards[1],
        "2.weight": shards[2], "2.bias": shards[2],
    }
    assert index["metadata"]["total_size"] == 3 * 4224
    for shard in shards:  # transformers insists on metadata format == "pt"
        with safe_open(str(ckpt / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}

    loaded = hf_load(ckpt)
    expected = model.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

    # And it loads back through the coordinator into a fresh model.
    fresh = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(3)])
    result = CheckpointCoordinator([StateComponent("model", fresh, "replicated")]).load_checkpoint(ckpt)
    assert result.loaded == ["model"] and result.skipped == {}
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_per_rank_flat_component_gets_a_merged_hf_index(tmp_path):
    # A tensor-only PER_RANK component (e.g. a pipeline stage) gets {key}.safetensors.index.json at the
    # top level, pointing into the per-rank folder.
    stage = torch.nn.Linear(4, 4)
    ckpt = Path(CheckpointCoordinator([StateComponent("stage", stage, "per_rank")]).save_checkpoint(tmp_path / "c"))
    assert files_under(ckpt) == {
        "checkpoint_manifest.json",
        "stage.safetensors.index.json",
        "stage/rank-00000.safetensors.index.json",
        "stage/rank-00000-00001-of-00001.safetensors",
    }
    loaded = hf_load(ckpt, "stage")
    assert set(loaded) == {"weight", "bias"}
    assert torch.equal(loaded["weight"], stage.weight) and torch.equal(loaded["bias"], stage.bias)


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.lm_head = torch.nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.embed.weight


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    with torch.no_grad():
        model.norm.weight.uniform_()
    coordinator = CheckpointCoordinator([StateComponent("model", model, "replicated")])
    ckpt = Path(coordinator.save_checkpoint(tmp_path / "tied.ckpt"))

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["embed.weight", "norm.bias", "norm.weight"]
    assert index["metadata"]["tied"] == {"lm_head.weight": "embed.weight"}
    assert index["metadata"]["total_size"] == (11 * 6 + 6 + 6) * 4  # the tied matrix counted once
    stored = load_file(str(ckpt / "model-00001-of-00001.safetensors"))
    assert sorted(stored) == ["embed.weight", "norm.bias", "norm.weight"]

    torch.manual_seed(123)
    fresh = TiedLM()
    assert not torch.equal(fresh.embed.weight, model.embed.weight)
    CheckpointCoordinator([StateComponent("model", fresh, "replicated")]).load_checkpoint(ckpt)
    assert fresh.lm_head.weight is fresh.embed.weight
    assert torch.equal(fresh.lm_head.weight, model.embed.weight)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def _training_setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _components(model, opt, sched):
    return [
        StateComponent("model", model, "replicated"),
        StateComponent("optimizer", opt, "replicated"),
        StateComponent("scheduler", sched, "global"),
        StateComponent("rng", RNGState(), "per_rank"),
    ]


def _step(model, opt, sched):
    model(torch.randn(4, 5)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _json_dict(node: Any) -> dict[Any, Any]:
    """One level of the JSON tree's dict encoding ({"__dict__": [[key, value], ...]}), keys decoded."""
    assert isinstance(node, dict) and list(node) == ["__dict__"], node
    return {key: value for key, value in node["__dict__"]}


def test_optimizer_in_safetensors_structure_in_json_no_pickle(tmp_path):
    model, opt, sched = _training_setup(0)
    for _ in range(3):
        _step(model, opt, sched)
    ckpt = Path(CheckpointCoordinator(_components(model, opt, sched)).save_checkpoint(tmp_path / "step=3.ckpt",
                                                                                     step=3))
    expected_files = {
        "checkpoint_manifest.json",
        "model-00001-of-00001.safetensors",
        "model.safetensors.index.json",
        "optimizer-00001-of-00001.safetensors",
        "optimizer.safetensors.index.json",
        "optimizer.json",
        "scheduler.json",
        "rng/rank-00000-00001-of-00001.safetensors",
        "rng/rank-00000.safetensors.index.json",
        "rng/rank-00000.json",
    }
    assert files_under(ckpt) == expected_files
    manifest = CheckpointManifest.load(ckpt)
    assert {f.path for f in manifest.all_files()} == expected_files - {"checkpoint_manifest.json"}
    assert manifest.step == 3
    # Every file is JSON or safetensors: nothing that needs unpickling.
    for rel in expected_files:
        data = (ckpt / rel).read_bytes()
        assert not data.startswith(b"\x80"), f"{rel} looks like a pickle"
        if rel.endswith(".json"):
            json.loads(data)
        else:
            load_file(str(ckpt / rel))

    # The optimizer's tensors are all in the safetensors shard; optimizer.json holds the structure and
    # refers to them by name.
    opt_tensors = load_file(str(ckpt / "optimizer-00001-of-00001.safetensors"))
    assert len(opt_tensors) == 4 * 3  # 4 params x (step, exp_avg, exp_avg_sq)
    body = json.loads((ckpt / "optimizer.json").read_text())
    assert body["format"] == "lightning_sharing.tree"
    text = json.dumps(body["tree"])
    assert '"betas"' in text and '"__tuple__"' in text and '"params"' in text
    per_param_tree = _json_dict(_json_dict(body["tree"])["state"])
    state = opt.state_dict()
    assert sorted(per_param_tree) == sorted(state["state"]) == [0, 1, 2, 3]
    for index, per_param in state["state"].items():
        refs = _json_dict(per_param_tree[index])
        assert sorted(refs) == sorted(per_param) == ["exp_avg", "exp_avg_sq", "step"]
        for name, tensor in per_param.items():
            assert torch.equal(opt_tensors[refs[name]["__tensor__"]], tensor), (index, name)

    # Load into fresh objects: states equal, and training continues identically.
    model_b, opt_b, sched_b = _training_setup(99)
    result = CheckpointCoordinator(_components(model_b, opt_b, sched_b)).load_checkpoint(ckpt)
    assert result.loaded == ["model", "optimizer", "scheduler", "rng"]
    assert_same(opt.state_dict(), opt_b.state_dict())
    assert sched_b.state_dict() == sched.state_dict()
    torch.manual_seed(7)
    _step(model, opt, sched)
    torch.manual_seed(7)
    _step(model_b, opt_b, sched_b)
    for name, tensor in model.state_dict().items():
        assert torch.equal(model_b.state_dict()[name], tensor), name
    assert sched_b.get_last_lr() == sched.get_last_lr()


def _draw() -> tuple[float, float, float, float, torch.Tensor]:
    # gauss() and standard_normal() consume the generators' cached second normal deviate.
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.standard_normal()),
            torch.rand(5))


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)
    np.random.standard_normal()  # legacy generator draws normals in pairs: one is now cached
    coordinator = CheckpointCoordinator([StateComponent("rng", RNGState(), "per_rank")])
    ckpt = coordinator.save_checkpoint(tmp_path / "rng.ckpt")
    after_save = _draw()
    for _ in range(3):  # move every generator on
        _draw()
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    assert _draw()[0] != after_save[0]
    coordinator.load_checkpoint(ckpt)
    after_load = _draw()
    assert after_load[:4] == after_save[:4]
    assert torch.equal(after_load[4], after_save[4])


def test_unsupported_state_refused_at_save_and_nothing_is_left(tmp_path):
    class Bad:
        def state_dict(self):
            return {"ok": 1, "callback": print}

        def load_state_dict(self, state):
            pass

    coordinator = CheckpointCoordinator([StateComponent("trainer", Bad(), "global")])
    with pytest.raises(CheckpointError) as info:
        coordinator.save_checkpoint(tmp_path / "bad.ckpt")
    message = str(info.value)
    assert "UnsupportedStateError" in message
    assert "'trainer'" in message and "state['callback']" in message
    assert isinstance(info.value.__cause__, UnsupportedStateError)
    assert os.listdir(tmp_path) == []  # no target, no staging directory


def test_paths_round_trip_as_paths() -> None:
    # Callbacks and hyper-parameters often hold pathlib paths: stored as strings, restored as Path.
    state = {"dirpath": Path("/runs/ckpts"), "relative": Path("a/b.txt"), "plain": "a/b.txt"}
    encoded = encode_state(state)
    decoded = decode_state(json.loads(json.dumps(encoded.tree)), encoded.tensors, encoded.ties)
    assert decoded == state
    assert isinstance(decoded["dirpath"], Path) and isinstance(decoded["plain"], str)


def test_load_reads_straight_into_live_parameters_and_optimizer_moments(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    components = [StateComponent("model", model, SharingPattern.REPLICATED),
                  StateComponent("optimizer", optimizer, SharingPattern.REPLICATED)]
    CheckpointCoordinator(components).save_checkpoint(tmp_path / "c.ckpt")
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]

    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # changes weights and moments
    addresses = [t.data_ptr() for t in model.state_dict().values()]
    moments = [optimizer.state[p]["exp_avg"] for p in model.parameters()]
    CheckpointCoordinator(components).load_checkpoint(tmp_path / "c.ckpt")

    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved_model.items())
    assert [t.data_ptr() for t in model.state_dict().values()] == addresses  # no second copy was made
    for param, live, saved in zip(model.parameters(), moments, saved_moments, strict=True):
        restored = optimizer.state[param]["exp_avg"]
        assert restored.data_ptr() == live.data_ptr() and torch.equal(restored, saved)


def test_large_file_hashed_alongside_the_io_has_the_checksum_of_its_bytes(tmp_path: Path) -> None:
    from lightning_sharing.format.safetensors_io import file_checksum, write_tensor_file

    path = tmp_path / "big.safetensors"
    tensors = {"a": torch.arange(18_000_000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)}
    size, checksum = write_tensor_file(path, tensors)  # 72 MB: hashed on the helper thread
    assert size == path.stat().st_size and checksum == file_checksum(path)
    back = read_tensor_file(path, checksum)
    assert torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    assert load_file(path).keys() == tensors.keys()  # plain safetensors reads it
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        byte = handle.read(1)
        handle.seek(size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CheckpointError, match=r"has checksum .* but the manifest records"):
        read_tensor_file(path, checksum)
