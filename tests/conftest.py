"""Suite-wide set-up.

Built version-0 models are kept in a folder of this test process (and the servers it
starts), not in the user's ``~/.cache``: each run builds each model spec once from the code
under test (``securefl.server.initial.cache_dir``), and what one run built never answers
for another.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile

from securefl.server.v0cache import CACHE_ENV

_cache = tempfile.mkdtemp(prefix="securefl-test-cache-")
os.environ[CACHE_ENV] = _cache
atexit.register(shutil.rmtree, _cache, True)

# A suite started from a background job (`make test &`, `nohup ... &`, some CI runners)
# inherits SIGINT ignored, and so did every program the tests start: the tests that press
# Ctrl-C on a send then waited for ever.  A Python handler here becomes the default
# disposition in each child, whose Python then takes Ctrl-C as a person's terminal would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
