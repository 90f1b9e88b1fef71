"""What a user reads matches docs/troubleshooting.md: the corrupt-file message on load, word for word.

The documented block is turned into a pattern (``...`` for the shortened path, any 128-bit hex digest for the
checksums) and matched against the error a real load raises, so the page and the code cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.documented import documented as _documented
from support.documented import pattern as _pattern

from lightning_sharing import CorruptCheckpointError, SharingCheckpointIO


def test_corrupt_file_message_matches_the_troubleshooting_page(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.ckpt"
    checkpoint = {"state_dict": {"net.weight": torch.randn(4, 3), "net.bias": torch.zeros(4)}, "epoch": 0,
                  "global_step": 3, "pytorch-lightning_version": "2.6.6"}
    io = SharingCheckpointIO()
    io.save_checkpoint(checkpoint, path)
    shard = path / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        io.load_checkpoint(path)
    actual = f"{type(info.value).__name__}: {info.value}"
    documented = _documented("**A corrupt file**")
    assert documented.startswith("DistributedCorruptCheckpointError: loading checkpoint .../corrupt.ckpt")
    assert _pattern(documented).fullmatch(actual), f"\ndocumented: {documented}\nactual:     {actual}"
