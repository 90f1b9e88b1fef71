"""Object-store benchmark: a whole checkpoint saved to and loaded from S3 (moto's server) through each object client.

    python benchmarks/bench_object_store.py [--size-mib 1024] [--repeats 3] [--shard-mib 256]

Starts moto's S3 server on 127.0.0.1 (as the tests do). Each repeat saves one checkpoint of ``--size-mib`` MiB
(16 float32 tensors of a REPLICATED component, one process, safetensors shards of at most ``--shard-mib`` MiB) with
``CheckpointCoordinator.save_checkpoint("s3://...")`` and loads it back into the zeroed tensors with every checksum
verified (``torch.equal`` checked after), once with each client (``storage_options={"client": ...}``: ``fsspec``,
i.e. s3fs, and ``obstore``), the clients' order alternating between repeats. For every save and load it records the
wall time, this process's CPU time (every thread: the client library's event loop or Rust threads included) and the
requests moto served (counted from its request log, by method). Prints each value per client (the median over the
repeats) and the ratios.

The server runs on the same machine and shares its cores, so the numbers measure client and server on loopback,
not a network: clients are compared under the same conditions in the same run. moto copies a whole object for every
ranged GET, so larger shards cost it more per GET.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
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
CLIENTS = ("fsspec", "obstore")
_REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(GET|PUT|POST|HEAD|DELETE) ')  # werkzeug colours some lines


def _requests(log: Path, since: int) -> tuple[collections.Counter, int]:
    """Requests moto logged after byte ``since`` of its log, by method; and the log's size now."""
    text = log.read_bytes()
    return collections.Counter(_REQUEST.findall(text[since:].decode(errors="replace"))), len(text)


def _measure(action: Callable[[], object], log: Path) -> dict[str, object]:
    time.sleep(0.5)  # let moto finish writing its log of the previous step
    _, mark = _requests(log, 0)
    start, start_cpu = time.perf_counter(), time.process_time()
    action()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    time.sleep(0.5)
    counted, _ = _requests(log, mark)
    return {"wall": wall, "cpu": cpu, "requests": counted}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-mib", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        server = MotoServer(Path(scratch) / "moto.log")
        server.start()
        try:
            os.environ.update(s3_environment(server.endpoint_url))
            return _run(args, server.log)
        finally:
            server.stop()


def _run(args: argparse.Namespace, log: Path) -> int:
    import moto
    import obstore
    import s3fs
    import torch

    from lightning_sharing import CheckpointCoordinator, SharingPattern, StateComponent
    from lightning_sharing.storage import remove_checkpoint

    torch.set_num_threads(1)
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
    size = args.size_mib * MIB
    module = torch.nn.ParameterDict({f"w{i:02d}": torch.nn.Parameter(torch.randn(size // 4 // 16))
                                     for i in range(16)})
    saved = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    print(f"checkpoint {size / 1e9:.2f} GB in shards of at most {args.shard_mib} MiB, {args.repeats} repeats; "
          f"s3fs {s3fs.__version__}, obstore {obstore.__version__}, moto {moto.__version__} on loopback; "
          f"{os.cpu_count()} cores")
    results: dict[tuple[str, str], list[dict[str, object]]] = collections.defaultdict(list)
    for repeat in range(args.repeats):
        for client in CLIENTS if repeat % 2 == 0 else CLIENTS[::-1]:
            options = {"client": client}
            coordinator = CheckpointCoordinator([StateComponent("model", module, SharingPattern.REPLICATED)],
                                                storage_options=options, max_shard_size=args.shard_mib * MIB)
            url = f"s3://{BUCKET}/bench-{uuid.uuid4().hex}/step=1.ckpt"
            results[client, "save"].append(_measure(lambda c=coordinator, u=url: c.save_checkpoint(u, step=1), log))
            with torch.no_grad():
                for tensor in module.parameters():
                    tensor.zero_()
            results[client, "load"].append(_measure(lambda c=coordinator, u=url: c.load_checkpoint(u), log))
            assert all(torch.equal(module.state_dict()[name], value) for name, value in saved.items()), "load differs"
            remove_checkpoint(url, options)
            print(f"repeat {repeat + 1} {client}: " + ", ".join(
                f"{op} {results[client, op][-1]['wall']:.2f} s wall, {results[client, op][-1]['cpu']:.2f} s CPU"
                for op in ("save", "load")))

    print("\nmedian over the repeats:")
    print("| client | operation | wall s | MB/s | CPU s | requests |")
    print("|---|---|---|---|---|---|")
    median: dict[tuple[str, str, str], float] = {}
    for (client, op), runs in sorted(results.items()):
        for field in ("wall", "cpu"):
            median[client, op, field] = statistics.median(float(run[field]) for run in runs)
        requests = runs[-1]["requests"]
        shown = ", ".join(f"{count} {method}" for method, count in sorted(requests.items()))
        print(f"| {client} | {op} | {median[client, op, 'wall']:.2f} | {size / median[client, op, 'wall'] / 1e6:.0f} "
              f"| {median[client, op, 'cpu']:.2f} | {sum(requests.values())} ({shown}) |")
    for op in ("save", "load"):
        print(f"{op}: obstore / fsspec wall {median['obstore', op, 'wall'] / median['fsspec', op, 'wall']:.2f}, "
              f"CPU {median['obstore', op, 'cpu'] / median['fsspec', op, 'cpu']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
