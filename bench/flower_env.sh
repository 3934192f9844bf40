#!/usr/bin/env bash
# Make the separate virtual environment for the Flower reference benchmark
# (bench/flower_ref.py): bench/.flower-venv with flwr==1.42.0 from PyPI.
# Flower stays out of the project's own .venv: its pins may clash with ours.
#
#     bash bench/flower_env.sh          # idempotent: does nothing if already there
set -euo pipefail

FLWR_VERSION=1.42.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.flower-venv"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$FLWR_VERSION" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version
sys.exit(version("flwr") != sys.argv[1])
PY
    echo "flower venv ready: $venv (flwr $FLWR_VERSION)"
    exit 0
fi

"$python" -m venv "$venv"
# Keep the whole venv out of git whatever the repository's .gitignore says (Python 3.13's
# venv writes the same file).
echo '*' > "$venv/.gitignore"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "flwr==$FLWR_VERSION"
"$venv/bin/python" -c "import flwr; print('flower venv ready:', '$venv', 'flwr', flwr.__version__)"
