"""The layering of DESIGN.md, checked by machine: imports point downwards only."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "securefl"

# layer -> securefl subpackages/modules it may import (besides itself, securefl.errors and
# securefl.fsutil, the two leaf modules every layer shares)
ALLOWED = {
    "crypto": set(),
    "protocol": {"crypto"},
    "ml": set(),
    "server": {"crypto", "protocol", "config", "ml", "certs", "fedopt"},
    "client": {"crypto", "protocol", "config", "ml", "certs"},
    "tui": {"client", "ml", "config", "crypto", "certs"},
}
THIRD_PARTY_OWNER = {"tensorflow": "ml", "keras": "ml", "textual": "tui"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        layer = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else None
        yield path, layer


@pytest.mark.parametrize(("path", "layer"), list(modules()), ids=lambda v: str(v))
def test_imports_point_downwards(path, layer):
    for name in imports_of(path):
        top = name.split(".")[0]
        if top in THIRD_PARTY_OWNER:
            assert layer == THIRD_PARTY_OWNER[top], f"{path.name} imports {top}"
        if top != "securefl" or layer not in ALLOWED:
            continue
        parts = name.split(".")
        if len(parts) == 1 or parts[1] in ("errors", "fsutil", layer):
            continue
        assert parts[1] in ALLOWED[layer], f"{layer} may not import {name} ({path.name})"


def test_importing_crypto_loads_no_tensorflow_textual_or_asyncio():
    code = (
        "import sys, securefl.crypto.secagg, securefl.crypto.simulate, securefl.cli;"
        "bad = [m for m in ('tensorflow', 'keras', 'textual', 'asyncio', 'ssl')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
