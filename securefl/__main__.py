"""``python -m securefl``: the same as the ``securefl`` command."""

import sys

from securefl.cli import main

sys.exit(main())
