"""Object-store benchmark: lightning_sharing's streaming writer and ranged reader vs plain s3fs, same bytes, same run.

    python benchmarks/bench_object_store.py [--size-mib 256] [--repeats 3] [--part-mib 16] [--in-flight 8]

Starts moto's S3 server on 127.0.0.1 (as the tests do), then for each repeat, in turn, uploads the same random
payload with:

- ``ls_writer``: ``ObjectWriter`` fed 16 MiB chunks (parts of ``--part-mib`` MiB, ``--in-flight`` at once, the
  xxh3-128 checksum computed on the way; nothing staged on disk);
- ``s3fs_pipe``: ``S3FileSystem.pipe_file(path, payload)`` (the whole payload as one bytes object; s3fs sends
  50 MiB parts, 10 at a time, once the payload is 100 MiB or more);
- ``s3fs_open_write``: ``with fs.open(path, "wb") as f: f.write(chunk)`` per 16 MiB chunk (s3fs's default
  50 MiB blocks, one part at a time);

and reads it back whole with ``read_range_into`` (into one preallocated buffer, ranged GETs of ``--read-chunk-mib``
MiB, ``--in-flight`` at once) and with ``S3FileSystem.cat_file`` (50 MiB ranges, 10 at once). Then, end to end,
a whole checkpoint of the same size (16 float32 tensors, one process): ``ls_save`` is
``CheckpointCoordinator.save_checkpoint("s3://...")`` (safetensors streamed through ``ObjectWriter``, the manifest
committed with a conditional PUT), ``ls_load`` is ``load_checkpoint`` into the live tensors with every checksum
verified (ranged GETs of ``--read-chunk-mib`` MiB); they are compared with ``s3fs_pipe`` and ``s3fs_cat_file``.
moto reads and copies the whole object under a lock for every GET, ranged or not, so against moto fewer, larger
ranges read faster; on a real store a ranged GET costs only its bytes. Prints MB/s (decimal) per variant (median
of the repeats), this process's CPU seconds per GB (the client's cost, every thread), then the ratios.
The server runs on the same machine: the numbers measure client and server CPU on loopback, not a network.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.s3 import BUCKET, MotoServer, s3_environment  # noqa: E402

MIB = 1024 * 1024


def _timed(action: Callable[[], object], cpu: list[float]) -> float:
    """Wall seconds of ``action``; appends this process's CPU seconds (every thread) to ``cpu``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    action()
    cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part-mib", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--read-chunk-mib", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        server = MotoServer(Path(scratch) / "moto.log")
        server.start()
        try:
            os.environ.update(s3_environment(server.endpoint_url))
            return _run(args)
        finally:
            server.stop()


def _run(args: argparse.Namespace) -> int:
    import s3fs

    from lightning_sharing.format.safetensors_io import bytes_checksum
    from lightning_sharing.storage.object_store import ObjectWriter, object_info, read_range_into

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    size = args.size_mib * MIB
    payload = os.urandom(size)
    expected = bytes_checksum(payload)
    chunks = [memoryview(payload)[i:i + 16 * MIB] for i in range(0, size, 16 * MIB)]
    print(f"payload {size / 1e6:.0f} MB, {args.repeats} repeats; s3fs {s3fs.__version__}; server {server_version()}")

    def ls_writer(path: str) -> None:
        with ObjectWriter(fs, path, part_size=args.part_mib * MIB, max_in_flight=args.in_flight) as writer:
            for chunk in chunks:
                writer.write(chunk)
        assert writer.result == (size, expected), writer.result

    def s3fs_pipe(path: str) -> None:
        fs.pipe_file(path, payload)

    def s3fs_open_write(path: str) -> None:
        with fs.open(path, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)

    buffer = bytearray(size)

    def ls_read(path: str) -> None:
        read_range_into(fs, path, 0, buffer, chunk=args.read_chunk_mib * MIB, max_concurrency=args.in_flight)

    def s3fs_cat(path: str) -> None:
        assert len(fs.cat_file(path)) == size

    import torch

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
    from lightning_sharing.storage import object_backend, remove_checkpoint

    object_backend._READ_CHUNK = args.read_chunk_mib * MIB  # see the note on moto's ranged GETs above
    module = torch.nn.ParameterDict({f"w{i:02d}": torch.nn.Parameter(torch.randn(size // 4 // 16))
                                     for i in range(16)})
    coordinator = CheckpointCoordinator([StateComponent("model", module, SharingPattern.REPLICATED)])
    saved = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}

    def ls_save(url: str) -> None:
        coordinator.save_checkpoint(url, step=1)

    def ls_load(url: str) -> None:
        coordinator.load_checkpoint(url)

    writes = {"ls_writer": ls_writer, "s3fs_pipe": s3fs_pipe, "s3fs_open_write": s3fs_open_write}
    times: dict[str, list[float]] = {name: [] for name in [*writes, "ls_read_range_into", "s3fs_cat_file",
                                                           "ls_save", "ls_load"]}
    cpu: dict[str, list[float]] = {name: [] for name in times}
    for repeat in range(args.repeats):
        for name, write in writes.items():
            path = f"{BUCKET}/bench-{uuid.uuid4().hex}"
            times[name].append(_timed(lambda write=write, path=path: write(path), cpu[name]))
            info = object_info(fs, path)
            assert info is not None and info.size == size, (name, info)
            if name == "ls_writer":
                times["ls_read_range_into"].append(_timed(lambda path=path: ls_read(path), cpu["ls_read_range_into"]))
                assert buffer == payload, "read_range_into returned other bytes"
                times["s3fs_cat_file"].append(_timed(lambda path=path: s3fs_cat(path), cpu["s3fs_cat_file"]))
            fs.rm_file(path)
        url = f"s3://{BUCKET}/bench-{uuid.uuid4().hex}/step=1.ckpt"
        times["ls_save"].append(_timed(lambda url=url: ls_save(url), cpu["ls_save"]))
        with torch.no_grad():
            for tensor in module.parameters():
                tensor.zero_()
        times["ls_load"].append(_timed(lambda url=url: ls_load(url), cpu["ls_load"]))
        assert all(torch.equal(module.state_dict()[name], value) for name, value in saved.items()), "load differs"
        remove_checkpoint(url)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {size / t[-1] / 1e6:.0f} MB/s" for n, t in times.items()))

    rate = {name: size / statistics.median(t) / 1e6 for name, t in times.items()}
    print("\nmedian MB/s: " + ", ".join(f"{name} {value:.0f}" for name, value in rate.items()))
    print("client CPU s/GB (median): " + ", ".join(
        f"{name} {statistics.median(c) / size * 1e9:.1f}" for name, c in cpu.items()))
    print(f"ls_writer / s3fs_pipe        = {rate['ls_writer'] / rate['s3fs_pipe']:.2f}")
    print(f"ls_writer / s3fs_open_write  = {rate['ls_writer'] / rate['s3fs_open_write']:.2f}")
    print(f"ls_read_range_into / s3fs_cat_file = {rate['ls_read_range_into'] / rate['s3fs_cat_file']:.2f}")
    print(f"ls_save (checkpoint) / s3fs_pipe   = {rate['ls_save'] / rate['s3fs_pipe']:.2f}")
    print(f"ls_load (checkpoint) / s3fs_cat_file = {rate['ls_load'] / rate['s3fs_cat_file']:.2f}")
    return 0


def server_version() -> str:
    import moto

    return f"moto {moto.__version__} on loopback"


if __name__ == "__main__":
    sys.exit(main())
