"""Issue 16 item 16: what installing and first use print that tells the user nothing.

* ``pip install`` printed four ``BuildBackendWarning`` blocks: ``license = { text = ... }``
  is deprecated since setuptools 77 (PEP 639); the SPDX string is the supported form, and
  needs setuptools 77 or newer as the build backend.
* The first ``train`` after ``get`` printed Keras' "Skipping variable loading for optimizer"
  UserWarning: ``get`` saved a model whose optimiser had no slots yet.
* The TUI tests printed Pillow's ``getdata`` DeprecationWarning from inside textual-image.
"""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_uses_the_spdx_license_string_and_a_backend_that_reads_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str), \
        "license = { text = ... } makes setuptools >= 77 warn on every install"
    assert re.fullmatch(r"[A-Za-z0-9.\-+]+", project["project"]["license"])
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))
    backend = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert len(backend) == 1
    low = re.search(r">=\s*(\d+)", backend[0])
    assert low is not None and int(low.group(1)) >= 77, \
        "the SPDX license string needs setuptools 77 or newer to build"


def test_textual_image_pillow_deprecation_is_filtered_only_there() -> None:
    from PIL import Image
    from textual_image._pixeldata import PixelData

    with warnings.catch_warnings(record=True) as caught:
        list(PixelData(Image.new("L", (3, 2))))
    assert not [w for w in caught if "getdata" in str(w.message)]
    # The filter names textual-image's module: the same deprecation from our code still shows.
    with pytest.warns(DeprecationWarning, match="getdata"):
        warnings.warn_explicit("Image.Image.getdata is deprecated", DeprecationWarning,
                               "securefl/x.py", 1, module="securefl.x")


def test_an_editable_install_prints_no_build_backend_warning(tmp_path: Path) -> None:
    """``make test`` (``pip install -e '.[dev]'``) printed a ``BuildBackendWarning:
    Editable installation`` block on every install: with the package at the project root
    and no ``package-dir`` said, setuptools installs an import hook and warns that folders
    named like the package may shadow it.  ``package-dir = {"" = "."}`` makes it a plain
    ``.pth`` entry.  A real install into a fresh venv, of a copy of the project (the build
    writes into the folder it builds); ``-v`` because older pips hide what the backend
    says, while the recent one ``make`` upgrades to shows it."""
    import shutil
    import subprocess
    import sys

    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "securefl", project / "securefl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own view
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                           "--disable-pip-version-check", "-v", "-e", str(project)],
                          capture_output=True, text=True, timeout=240, env=env)
    if done.returncode and "Could not find a version that satisfies" in done.stderr:
        pytest.skip("no package index reachable for the build backend (setuptools>=77)")
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "BuildBackendWarning" not in said and "Editable installation" not in said, said
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import securefl; print(securefl.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True, env=env)
    assert check.stdout.strip() == str(project / "securefl" / "__init__.py")
