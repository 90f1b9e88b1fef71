import subprocess
import sys
from pathlib import Path

import pytest

# Workers run in spawned processes, which import test modules and the harness by name.
sys.path.insert(0, str(Path(__file__).parent))

# The S3 test server and its fault proxy, for any test that asks for them (started lazily, once a session).
from support.s3 import fault_proxy, moto_server, s3, s3_prefix  # noqa: F401

_ROOT = Path(__file__).resolve().parents[1]


def _untracked_files() -> set[str] | None:
    try:
        listing = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=_ROOT,
                                 capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout: nothing to compare
    return set(listing.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def _tests_leave_the_checkout_clean():
    """The suite writes only to temporary directories: new files in the checkout fail the run."""
    before = _untracked_files()
    yield
    after = _untracked_files()
    if before is not None and after is not None:
        new = sorted(after - before)
        assert not new, f"the tests left {len(new)} new files in the checkout, e.g. {new[:5]}"
