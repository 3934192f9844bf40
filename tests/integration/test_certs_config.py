"""The certificate folder, hospital kits and settings files, on a real file system."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from securefl import config
from securefl.certs import CertDir
from securefl.cli import main
from securefl.crypto import pki
from securefl.errors import ConfigError


def test_init_makes_ca_server_admin_hospitals_kits_and_crl(tmp_path: Path) -> None:
    assert main(["certs", "--dir", str(tmp_path / "certs"), "init", "--server-host",
                 "fl.example.org,10.0.0.5", "--hospitals", "north,south"]) == 0
    cd = CertDir(tmp_path / "certs")
    ca = cd.ca().cert
    for path in tmp_path.rglob("*.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server = pki.load_cert((cd.root / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days <= 90
    for name in ("north", "south"):
        kit = cd.kit(name)
        assert sorted(p.name for p in kit.iterdir()) == [
            "ca.pem", "crl.pem", "hospital.key", "hospital.pem", "hospital.toml"]
        cert = pki.load_cert((kit / "hospital.pem").read_bytes())
        assert pki.verify_issued_by(cert, ca) == (pki.Role.HOSPITAL, name)
        settings = config.load(kit / "hospital.toml", config.ClientSettings)
        assert settings.host == "fl.example.org" and settings.cert == kit / "hospital.pem"
    admin = pki.load_cert((cd.root / "admin.pem").read_bytes())
    assert pki.identity_of(admin) == (pki.Role.ADMIN, "admin")
    crl = x509.load_pem_x509_crl((cd.root / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0  # type: ignore[arg-type]
    server_settings = config.load(cd.root / "server.toml", config.ServerSettings)
    assert server_settings.hospitals == ["north", "south"]


def test_add_revoke_renew_show(tmp_path: Path) -> None:
    cd = CertDir(tmp_path)
    cd.init(["localhost"], ["a"])
    cd.add_hospital("b")
    with pytest.raises(ConfigError):
        cd.add_hospital("b")
    old_server = (tmp_path / "server.pem").read_bytes()
    cd.revoke("b")
    serial = pki.load_cert(cd.member_cert("b").read_bytes()).serial_number
    crl = x509.load_pem_x509_crl(cd.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    cd.renew()
    assert (tmp_path / "server.pem").read_bytes() != old_server
    rows = {r["name"]: r for r in cd.show()}
    assert rows["b"]["status"] == "revoked" and rows["a"]["status"] == "valid"
    assert len(rows["a"]["sha256"]) == 95
    with pytest.raises(ConfigError):
        cd.init(["localhost"], ["a"])  # never overwrite a federation
    with pytest.raises(ConfigError):
        cd.revoke("nobody")


def test_settings_refuse_typos_and_resolve_paths(tmp_path: Path) -> None:
    good = {"cert": "c.pem", "key": "k.pem", "ca": "ca.pem", "port": 1234}
    config.write_toml(tmp_path / "h.toml", good)
    s = config.load(tmp_path / "h.toml", config.ClientSettings)
    assert s.cert == tmp_path / "c.pem" and s.port == 1234
    assert s.state_dir == tmp_path / "state"
    # An older kit's key names are refused with the new name, never guessed.
    config.write_toml(tmp_path / "old.toml", {**good, "data_dir": "state"})
    with pytest.raises(ConfigError, match="data_dir was renamed state_dir"):
        config.load(tmp_path / "old.toml", config.ClientSettings)
    config.write_toml(tmp_path / "old-ml.toml",
                      {**good, "ml": {"data_dir": "x", "model_dir": "m"}})
    with pytest.raises(ConfigError, match=r"\[ml\] data_dir was renamed scans_dir"):
        config.load(tmp_path / "old-ml.toml", config.ClientSettings)
    config.write_toml(tmp_path / "bad.toml", {**good, "prot": 5})
    with pytest.raises(ConfigError, match="prot"):
        config.load(tmp_path / "bad.toml", config.ClientSettings)
    config.write_toml(tmp_path / "bad2.toml", {**good, "port": 99999})
    with pytest.raises(ConfigError, match="port"):
        config.load(tmp_path / "bad2.toml", config.ClientSettings)
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.toml", config.ClientSettings)


def test_renew_a_hospital_or_the_admin_keeps_the_kit_settings(tmp_path: Path) -> None:
    import datetime as dt

    cd = CertDir(tmp_path)
    cd.init(["localhost"], ["a", "b"])
    kit = cd.kit("a")
    settings = kit / "hospital.toml"
    settings.write_text(settings.read_text() + "# edited by the hospital\n")
    old = pki.load_cert((kit / "hospital.pem").read_bytes())
    old_key = (kit / "hospital.key").read_bytes()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=300)  # a month before expiry
    assert cd.renew("a", now=later) == kit
    new = pki.load_cert((kit / "hospital.pem").read_bytes())
    assert new.serial_number != old.serial_number and (kit / "hospital.key").read_bytes() != old_key
    assert new.not_valid_after_utc - later >= dt.timedelta(days=364)
    assert pki.identity_of(new) == (pki.Role.HOSPITAL, "a")
    assert cd.member_cert("a").read_bytes() == (kit / "hospital.pem").read_bytes()
    assert settings.read_text().endswith("# edited by the hospital\n")
    assert oct((kit / "hospital.key").stat().st_mode & 0o777) == "0o600"
    old_admin = (tmp_path / "admin.pem").read_bytes()
    cd.renew("admin")
    assert (tmp_path / "admin.pem").read_bytes() != old_admin
    cd.revoke("b")
    with pytest.raises(ConfigError, match="revoked"):
        cd.renew("b")
    with pytest.raises(ConfigError, match="add-hospital"):
        cd.renew("nobody")
