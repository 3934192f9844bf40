"""The one atomic-write helper: a failed write leaves the old file whole and no debris."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from securefl.fsutil import file_sha256, replace_file

# FIPS 180-2, appendix B.1: SHA-256("abc").
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_replaces_bytes_with_the_mode_asked(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    replace_file(target, b"abc", mode=0o644)
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    replace_file(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # private unless asked otherwise
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b'{"v": 1}')

    def half_then_fail(f) -> None:
        f.write(b'{"v": 2')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_file(target, half_then_fail)
    assert target.read_bytes() == b'{"v": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_missing_folder_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        replace_file(tmp_path / "gone" / "f.bin", b"new")
    assert list(tmp_path.iterdir()) == []


def test_file_sha256_matches_the_published_vector_and_misses_are_none(tmp_path: Path) -> None:
    (tmp_path / "abc").write_bytes(b"abc")
    assert file_sha256(tmp_path / "abc") == ABC_SHA256
    assert file_sha256(tmp_path / "missing") is None
    assert file_sha256(tmp_path) is None  # a folder is not the file expected
