"""Issue 16 item 15: a certificate file that cannot be used is named, with the reason.

Before, a hospital whose key belonged to another certificate read "cannot load this site's
certificates (.../hospital.pem, .../ca.pem)": no reason, and ca.pem named instead of the
key.  Each case here runs the real command a hospital runs (``client ... status``, which
stops before any connection) or builds the server's real TLS context.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from securefl.certs import CertDir
from securefl.cli import main
from securefl.errors import ConfigError
from securefl.server.tls import server_context

from .conftest import Federation


def _status(fed: Federation, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["client", "--config", str(fed.certs.kit("a") / "hospital.toml"),
                 "status"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("securefl: ") and "\n" not in err, err  # one sentence, one line
    return err


def test_a_key_of_another_certificate_is_named(fed: Federation, capsys) -> None:
    kit = fed.certs.kit("a")
    shutil.copy(fed.certs.kit("b") / "hospital.key", kit / "hospital.key")
    err = _status(fed, capsys)
    assert f"the private key {kit / 'hospital.key'} does not belong to the certificate " \
           f"{kit / 'hospital.pem'}" in err
    assert "ca.pem" not in err


def test_missing_folder_and_garbage_files_are_named(fed: Federation, capsys) -> None:
    kit = fed.certs.kit("a")
    key = (kit / "hospital.key").read_bytes()
    (kit / "hospital.key").unlink()
    assert f"the private key {kit / 'hospital.key'} does not exist" in _status(fed, capsys)
    (kit / "hospital.key").mkdir()
    assert f"the private key {kit / 'hospital.key'} is a folder" in _status(fed, capsys)
    (kit / "hospital.key").rmdir()
    (kit / "hospital.key").write_bytes(b"not a key\n")
    assert f"{kit / 'hospital.key'} is not a PEM private key" in _status(fed, capsys)
    (kit / "hospital.key").write_bytes(key)
    (kit / "hospital.pem").write_text("hello\n")
    assert f"{kit / 'hospital.pem'} is not a PEM certificate" in _status(fed, capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_key_is_named(fed: Federation, capsys) -> None:
    kit = fed.certs.kit("a")
    (kit / "hospital.key").chmod(0)
    assert f"cannot read the private key {kit / 'hospital.key'} (Permission denied)" \
        in _status(fed, capsys)


def test_a_certificate_of_another_federation_is_named(fed: Federation, capsys,
                                                      tmp_path: Path) -> None:
    other = CertDir(tmp_path / "other")
    other.init(["localhost"], ["a"])
    kit = fed.certs.kit("a")
    for name in ("hospital.pem", "hospital.key"):
        shutil.copy(other.kit("a") / name, kit / name)
    err = _status(fed, capsys)
    assert f"the certificate {kit / 'hospital.pem'} was not issued by the CA in " \
           f"{kit / 'ca.pem'}" in err


def test_the_server_names_its_own_mismatched_key(fed: Federation) -> None:
    root = fed.certs.root
    with pytest.raises(ConfigError, match=r"the private key .*admin\.key does not belong to "
                                          r"the certificate .*server\.pem"):
        server_context(root / "server.pem", root / "admin.key", root / "ca.pem",
                       root / "crl.pem")


def test_the_server_with_a_wrong_ca_path_says_so_and_makes_no_store(fed: Federation) -> None:
    """A wrong path in server.toml is one sentence naming the file, and nothing is created
    at the store's place: before, the server wrote a version 0 there and then crashed with
    a traceback on the CA file."""
    import subprocess
    import sys

    from securefl import config

    toml = fed.server_toml(port=0)
    data = config.read_toml(toml)
    data.update(ca=str(fed.tmp / "nowhere" / "ca.pem"), store_dir=str(fed.tmp / "new-store"))
    config.write_toml(toml, data)
    run = subprocess.run([sys.executable, "-m", "securefl", "server", "--config", str(toml)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    err = run.stderr.strip()
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("securefl: ")
    assert f"the CA certificate {fed.tmp / 'nowhere' / 'ca.pem'} does not exist" in err
    assert not (fed.tmp / "new-store").exists()
