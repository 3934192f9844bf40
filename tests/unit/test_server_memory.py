"""The server's process-level memory setting (see ``securefl.server.main``)."""

from __future__ import annotations

import subprocess
import sys


def test_the_mmap_threshold_is_pinned_on_glibc() -> None:
    """CI runs on glibc Linux: there the call must take effect, or the server's memory
    goes back to varying by a model's worth between identical rounds.  Run in a child
    process so the test runner's own allocator is left alone."""
    code = ("from securefl.server.main import fix_mmap_threshold; "
            "import sys; sys.exit(0 if fix_mmap_threshold() else 3)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
