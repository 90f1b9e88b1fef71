"""Streams one 12 MiB object to URL in 5 MiB parts; run with LIGHTNING_SHARING_FAULTS=save:write@0:kill to be
SIGKILLed mid-upload (by tests/distributed/test_object_store_processes.py).

    python object_store_killed_writer.py URL
"""

from __future__ import annotations

import os
import sys

from lightning_sharing.storage.object_store import open_store, write_object

MIB = 1024 * 1024

if __name__ == "__main__":
    fs, path = open_store(sys.argv[1])
    write_object(fs, path, [os.urandom(6 * MIB), os.urandom(6 * MIB)], part_size=5 * MIB)
    print("written")
