"""docs/SECURITY.md claims nothing that no test shows: every test it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names.update(re.findall(r"^\s*(?:async )?def (test_\w+)", path.read_text(), re.M))
    return names


def test_every_test_named_in_security_md_exists() -> None:
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    named = set(re.findall(r"`(test_\w+)(?:\[[^\]]*\])?`", text))
    assert len(named) > 40  # the tables name the tests
    defined = _defined_tests()
    missing = sorted(n for n in named if n not in defined)
    assert not missing, f"docs/SECURITY.md names tests that do not exist: {missing}"


def test_every_test_file_named_in_security_md_exists() -> None:
    text = (ROOT / "docs" / "SECURITY.md").read_text()
    for rel in set(re.findall(r"`(tests/[\w/]+\.py)`", text)):
        assert (ROOT / rel).is_file(), f"docs/SECURITY.md names {rel}, which does not exist"
