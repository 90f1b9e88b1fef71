"""The threaded local-file reader and the helper-thread runner that loads and saves hash with."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import pytest
import torch
import xxhash

from lightning_sharing.errors import CorruptCheckpointError
from lightning_sharing.format.overlapped import Overlapped
from lightning_sharing.format.parallel_read import PIECE, read_ranges
from lightning_sharing.format.safetensors_io import file_checksum, read_tensor_file, write_tensor_file

_SIZE = 12 * PIECE + 12345  # above the parallel threshold, not a whole number of pieces


def _random_file(path: Path, size: int = _SIZE) -> bytes:
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    path.write_bytes(data.numpy().tobytes())
    return path.read_bytes()


class _OrderedDigest:
    """A digest's update that fails if two threads call it at once."""

    def __init__(self) -> None:
        self.digest = xxhash.xxh3_128()
        self.busy = threading.Lock()

    def update(self, piece: memoryview) -> None:
        if not self.busy.acquire(blocking=False):
            raise AssertionError("two threads hashed at once")
        try:
            self.digest.update(piece)
        finally:
            self.busy.release()


@pytest.mark.parametrize("readers", [1, 2, 3])
def test_ranges_are_filled_and_hashed_in_file_order(tmp_path: Path, readers: int) -> None:
    data = _random_file(tmp_path / "f")
    # Three ranges in file order, one of them smaller than a piece, leaving no byte out.
    cuts = [0, 5 * PIECE + 7, 5 * PIECE + 1000, len(data)]
    buffers = [bytearray(high - low) for low, high in itertools.pairwise(cuts)]
    digest = _OrderedDigest()
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        read_ranges(fd, [(low, memoryview(buf)) for low, buf in zip(cuts, buffers, strict=False)], "f", digest.update,
                    readers=readers)
    finally:
        os.close(fd)
    assert b"".join(buffers) == data
    assert digest.digest.hexdigest() == xxhash.xxh3_128(data).hexdigest()


def test_without_a_hash_the_ranges_are_still_filled(tmp_path: Path) -> None:
    data = _random_file(tmp_path / "f")
    target = bytearray(len(data) - 100)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        read_ranges(fd, [(100, memoryview(target))], "f", None, readers=2)
    finally:
        os.close(fd)
    assert bytes(target) == data[100:]


@pytest.mark.parametrize("readers", [1, 2])
def test_a_file_shorter_than_its_ranges_is_named_as_truncated(tmp_path: Path, readers: int) -> None:
    data = _random_file(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        with pytest.raises(CorruptCheckpointError, match=r"^f ended early while being read \(truncated\?\)$"):
            read_ranges(fd, [(0, memoryview(bytearray(len(data) + PIECE)))], "f", None, readers=readers)
    finally:
        os.close(fd)


def test_an_os_error_on_a_reading_thread_is_raised_to_the_caller(tmp_path: Path) -> None:
    _random_file(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_WRONLY)  # preadv on it fails with EBADF on every thread
    try:
        with pytest.raises(OSError) as raised:
            read_ranges(fd, [(0, memoryview(bytearray(_SIZE)))], "f", None, readers=2)
    finally:
        os.close(fd)
    assert raised.value.errno == 9
    assert not [t for t in threading.enumerate() if t.name == "lightning_sharing-read"]


def test_a_large_local_file_loads_in_parallel_and_a_flipped_byte_is_caught(tmp_path: Path) -> None:
    tensors = {"big": torch.randn(3 * PIECE), "small": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "model.safetensors"
    size, checksum = write_tensor_file(path, tensors)
    assert size == path.stat().st_size and checksum == file_checksum(path)
    live = {"big": torch.zeros(3 * PIECE)}
    loaded = read_tensor_file(path, checksum, into=live)
    assert loaded["big"].data_ptr() == live["big"].data_ptr()  # read into the live tensor in place
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    raw = bytearray(path.read_bytes())
    raw[size // 2] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(CorruptCheckpointError, match=r"^model\.safetensors has checksum xxh3_128:[0-9a-f]+ but "
                                                     r"the manifest records " + checksum):
        read_tensor_file(path, checksum)


def test_overlapped_work_runs_in_order_and_its_error_reaches_finish() -> None:
    seen: list[int] = []

    def work(item: int) -> None:
        if item == 3:
            raise ValueError("item 3 is bad")
        seen.append(item)

    for threaded in (False, True):
        seen.clear()
        hashing: Overlapped[int] = Overlapped(work, threaded=threaded, bound=1)
        with hashing, pytest.raises(ValueError, match="item 3 is bad"):
            for item in range(50):  # with bound=1 a thread that stopped draining would block this for ever
                hashing.submit(item)
            hashing.finish()
        assert seen == [0, 1, 2]
