"""Issue 16 item 16: what installing and first use print that tells the user nothing.

* ``pip install`` printed four ``BuildBackendWarning`` blocks: ``license = { text = ... }``
  is deprecated since setuptools 77 (PEP 639); the SPDX string is the supported form, and
  needs setuptools 77 or newer as the build backend.
* The first ``train`` after ``get`` printed Keras' "Skipping variable loading for optimizer"
  UserWarning: ``get`` saved a model whose optimiser had no slots yet.
* The TUI tests printed Pillow's ``getdata`` DeprecationWarning from inside textual-image.
"""

from __future__ import annotations

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
