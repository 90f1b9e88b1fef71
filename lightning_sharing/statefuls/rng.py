"""``RNGState``: the random number generators of this process, as a stateful component.

Declare it PER_RANK: every rank draws its own random numbers (dropout masks, shuffles).

Example:
    >>> from lightning_sharing import RNGState, SharingPattern, StateComponent
    >>> StateComponent("rng", RNGState(), SharingPattern.PER_RANK).key
    'rng'
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from lightning_sharing.statefuls.holders import ValueHolder

__all__ = ["RNGHolder", "RNGState", "Reseed", "restore_rng"]

log = logging.getLogger(__name__)


class RNGState:
    """Python ``random``, NumPy's global generator, torch's CPU generator and every CUDA device's.

    The state dict holds only tensors, ints, floats, strings and tuples, so it is stored without
    pickle and loads under ``torch.load(weights_only=True)`` rules too.
    """

    def state_dict(self) -> dict[str, Any]:
        """Capture the current state of every generator."""
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "torch": torch.get_rng_state(),
        }
        numpy_state = _numpy_state()
        if numpy_state is not None:
            state["numpy"] = numpy_state
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def reseed(self, seed: int) -> None:
        """Seed every generator from ``seed`` (``on_resize="reseed"``: a resumed run at another world size).

        Python ``random``, NumPy, torch's CPU generator and every CUDA device's each get a seed derived from
        ``seed`` and their name, so the streams differ from one another and are reproducible.
        """
        def derived(name: str) -> int:
            return xxhash.xxh64_intdigest(f"{seed}:{name}".encode()) & (2**63 - 1)

        random.seed(derived("python"))
        torch.manual_seed(derived("torch"))  # also seeds every CUDA device
        try:
            import numpy as np
        except ImportError:
            return
        np.random.seed(derived("numpy") % 2**32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every generator captured by ``state_dict()``."""
        py = state_dict["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
        torch.set_rng_state(state_dict["torch"])
        if "numpy" in state_dict:
            _set_numpy_state(state_dict["numpy"])
        cuda_states = state_dict.get("cuda")
        if cuda_states:
            if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
                torch.cuda.set_rng_state_all(cuda_states)
            else:
                log.warning(
                    "checkpoint holds RNG state for %d CUDA devices but %d are visible here; "
                    "CUDA generators were not restored",
                    len(cuda_states), torch.cuda.device_count() if torch.cuda.is_available() else 0,
                )


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    try:
        import numpy as np
    except ImportError:
        log.warning("checkpoint holds NumPy RNG state but NumPy is not installed; skipped")
        return
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        (state["bit_generator"], keys, int(state["pos"]), int(state["has_gauss"]),
         float(state["cached_gaussian"]))
    )


@dataclass(frozen=True)
class Reseed:
    """Stands for an RNG state that is to be reseeded rather than restored (``on_resize="reseed"``)."""

    seed: int


class RNGHolder(ValueHolder):
    """Holds a loaded RNG state for the Trainer strategies to apply later (or a ``Reseed`` after a resize)."""

    def reseed(self, seed: int) -> None:
        self.value, self.loaded = Reseed(seed), True


def restore_rng(value: Any) -> None:
    """Apply what an ``RNGHolder`` holds: a saved RNG state, or a reseed."""
    if isinstance(value, Reseed):
        RNGState().reseed(value.seed)
    else:
        RNGState().load_state_dict(value)
