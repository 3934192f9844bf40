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
import tempfile

from securefl.server.v0cache import CACHE_ENV

_cache = tempfile.mkdtemp(prefix="securefl-test-cache-")
os.environ[CACHE_ENV] = _cache
atexit.register(shutil.rmtree, _cache, True)
