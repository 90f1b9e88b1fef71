"""Bit-for-bit comparison of nested state (dicts, lists, tuples of tensors, NumPy arrays and plain values)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def same_state(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` have the same structure and every tensor (dtype included) and array is equal."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b
