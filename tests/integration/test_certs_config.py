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
from securefl.crypto.membership import MemberList, fingerprint
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
            "ca.pem", "crl.pem", "hospital.key", "hospital.pem", "hospital.toml",
            "members.json"]
        cert = pki.load_cert((kit / "hospital.pem").read_bytes())
        assert pki.verify_issued_by(cert, ca) == (pki.Role.HOSPITAL, name)
        settings = config.load(kit / "hospital.toml", config.ClientSettings)
        assert settings.host == "fl.example.org" and settings.cert == kit / "hospital.pem"
        assert settings.members == kit / "members.json"
        # The kit's member list: both hospitals, pinned to their certificates, CA-signed.
        listed = MemberList.load((kit / "members.json").read_bytes(), ca)
        assert sorted(listed.members) == ["north", "south"]
        assert listed.members[name] == fingerprint(pki.cert_der(cert))
    admin = pki.load_cert((cd.root / "admin.pem").read_bytes())
    assert pki.identity_of(admin) == (pki.Role.ADMIN, "admin")
    crl = x509.load_pem_x509_crl((cd.root / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0  # type: ignore[arg-type]
    server_settings = config.load(cd.root / "server.toml", config.ServerSettings)
    assert server_settings.hospitals == ["north", "south"]
    assert server_settings.members == cd.members


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
    # The revocation list's own expiry is listed too (a walk: the docs say renew monthly,
    # show did not say when): renew() just wrote list #3 (init, revoke, renew).
    crl_row = rows["revocation list #3"]
    due = x509.load_pem_x509_crl(cd.crl.read_bytes()).next_update_utc
    assert crl_row["role"] == "crl" and crl_row["status"] == "valid"
    assert crl_row["expires"] == f"{due:%Y-%m-%d %H:%M} UTC"
    assert crl_row["sha256"] == "1 revoked; renew with `securefl certs renew`"
    import datetime as dt

    cd.renew(now=dt.datetime.now(dt.UTC) - dt.timedelta(days=40))  # a list that lapsed
    lapsed = {r["name"]: r for r in cd.show()}["revocation list #4"]
    assert lapsed["status"] == "expired"
    assert lapsed["sha256"] == "renew it now: `securefl certs renew`"
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


def test_the_member_list_follows_add_revoke_and_renew_into_every_kit(tmp_path: Path) -> None:
    cd = CertDir(tmp_path)
    cd.init(["localhost"], ["a", "b"])
    ca = cd.ca().cert

    def kit_list(name: str) -> MemberList:
        listed = MemberList.load((cd.kit(name) / "members.json").read_bytes(), ca)
        assert (cd.kit(name) / "members.json").read_bytes() == cd.members.read_bytes()
        return listed

    def pinned(name: str) -> str:
        return fingerprint(pki.cert_der(pki.load_cert(cd.member_cert(name).read_bytes())))

    first = kit_list("a")
    assert sorted(first.members) == ["a", "b"]
    cd.add_hospital("c")
    added = kit_list("a")  # the older kits get the new list too
    assert sorted(added.members) == ["a", "b", "c"] and added.number > first.number
    cd.revoke("b")
    revoked = kit_list("c")
    assert sorted(revoked.members) == ["a", "c"] and revoked.number > added.number
    old_a = pinned("a")
    cd.renew("a")
    renewed = kit_list("c")
    assert renewed.members["a"] == pinned("a") != old_a and renewed.number > revoked.number
    # A revoked hospital may come back, with a new certificate (and on the list again).
    cd.add_hospital("b")
    assert kit_list("a").members["b"] == pinned("b")
    for reserved in ("server", "admin"):
        with pytest.raises(ConfigError, match=f"'{reserved}' names the federation's own"):
            cd.add_hospital(reserved)


def test_revoking_the_server_certificate_issues_a_new_one(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    cd = CertDir(tmp_path)
    cd.init(["localhost"], ["a"])
    old = pki.load_cert((tmp_path / "server.pem").read_bytes())
    assert main(["certs", "--dir", str(tmp_path), "revoke", "server"]) == 0
    assert "copy server.pem, server.key and crl.pem to the server" in capsys.readouterr().out
    new = pki.load_cert((tmp_path / "server.pem").read_bytes())
    assert new.serial_number != old.serial_number
    assert pki.verify_issued_by(new, cd.ca().cert) == (pki.Role.SERVER, "server")
    crl = pki.load_crl(cd.crl.read_bytes(), cd.ca().cert)
    assert pki.revoked_serials(crl) == {old.serial_number}
    assert (cd.kit("a") / "crl.pem").read_bytes() == cd.crl.read_bytes()
    # The admin's certificate can be revoked too (renew admin issues the next one).
    admin = pki.load_cert((tmp_path / "admin.pem").read_bytes())
    cd.revoke("admin")
    crl = pki.load_crl(cd.crl.read_bytes(), cd.ca().cert)
    assert admin.serial_number in pki.revoked_serials(crl)


def test_certs_members_resigns_the_list_for_an_older_folder(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    cd = CertDir(tmp_path)
    cd.init(["localhost"], ["a", "b"])
    cd.members.unlink()  # a folder made before member lists
    for kit in ("a", "b"):
        (cd.kit(kit) / "members.json").unlink()
    assert main(["certs", "--dir", str(tmp_path), "members"]) == 0
    assert "(2 hospitals)" in capsys.readouterr().out
    listed = MemberList.load((cd.kit("b") / "members.json").read_bytes(), cd.ca().cert)
    assert sorted(listed.members) == ["a", "b"]


def test_the_generated_server_listens_on_this_machines_address_or_warns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 14 (defaults): server.toml used to listen on every interface whatever the
    operator named.  Now it listens on the first --server-host that is an address of this
    machine; with none, on every interface, and init says so."""
    assert main(["certs", "--dir", str(tmp_path / "a"), "init", "--server-host",
                 "fl.example.org,127.0.0.1", "--hospitals", "north"]) == 0
    assert config.load(tmp_path / "a" / "server.toml", config.ServerSettings).host == \
        "127.0.0.1"
    assert "warning" not in capsys.readouterr().err
    assert main(["certs", "--dir", str(tmp_path / "b"), "init", "--server-host",
                 "fl.example.org,192.0.2.7", "--hospitals", "north"]) == 0
    assert config.load(tmp_path / "b" / "server.toml", config.ServerSettings).host == \
        "0.0.0.0"
    err = capsys.readouterr().err
    assert "none of fl.example.org, 192.0.2.7 is an address of this machine" in err
    assert "set host to the address hospitals connect to" in err
