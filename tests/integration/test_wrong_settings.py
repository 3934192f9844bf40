"""The settings mix-ups a new user makes, each answered in one sentence that says what to
give instead (found walking docs/QUICKSTART.md as a newcomer): a kit's folder given to
``--config``, the administrator's file given to a hospital's command (and the other way
round), a misspelt key."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from securefl import config
from securefl.cli import EXIT_CODES, main
from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import ConfigError

from .conftest import Federation, running


def test_a_kit_folder_given_as_config_names_the_file_inside(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    kit = fed.certs.kit("a")
    assert main(["client", "--config", str(kit), "status"]) == EXIT_CODES[ConfigError] == 3
    err = capsys.readouterr().err
    assert f"{kit} is a folder, not a settings file: give the settings file inside it, " \
           f"e.g. {kit / 'hospital.toml'}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_misspelt_key_gets_the_nearest_one_the_table_has(
        fed: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = config.read_toml(fed.certs.kit("a") / "hospital.toml")
    data.setdefault("ml", {"scans_dir": "scans", "model_dir": "model"})["imagesize"] = 64
    data["keepalive_seconds"] = 3
    bad = tmp_path / "hospital.toml"
    config.write_toml(bad, data)
    assert main(["client", "--config", str(bad), "status"]) == 3
    err = capsys.readouterr().err
    assert "ml.imagesize: not a setting securefl knows (did you mean image_size?)" in err
    assert ("keepalive_seconds: not a setting securefl knows: remove it or check its "
            "spelling in docs/QUICKSTART.md") in err
    assert "Extra inputs" not in err


def test_the_administrators_file_given_to_a_hospital_command_and_the_other_way_round(
        fed: Federation) -> None:
    settings = fed.server_settings()

    async def scenario() -> tuple[str, str]:
        async with running(settings) as srv:
            with pytest.raises(ConfigError) as as_hospital:
                await HospitalSession(fed.client_settings("admin", srv.port)).connect()
            with pytest.raises(ConfigError) as as_admin:
                await AdminSession(fed.client_settings("a", srv.port)).connect()
            return as_hospital.value.message, as_admin.value.message

    hospital, admin = asyncio.run(scenario())
    assert hospital == ("these settings hold the certificate of the federation's "
                        "administrator, not of a hospital: give this hospital's hospital.toml "
                        "with `securefl client --config`")
    assert admin == ("these settings hold the certificate of a hospital, not of the "
                     "federation's administrator: give the administrator's admin.toml with "
                     "`securefl admin --config`")


def test_the_servers_file_given_to_a_client_and_a_hospitals_to_the_server(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """Walking it, these got a list of "not a setting securefl knows (did you mean
    state_dir?)" clauses, which read as typos to fix; it is the wrong file."""
    server_toml = fed.certs.root / "server.toml"
    kit_toml = fed.certs.kit("a") / "hospital.toml"
    for argv in (["client", "--config", str(server_toml), "status"],
                 ["admin", "--config", str(server_toml), "status"]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert f"{server_toml} is the server's settings file, not a hospital's or the " \
               "administrator's: give a hospital's hospital.toml (its kit) to `securefl " \
               "client`, or admin.toml to `securefl admin`" in err, err
        assert "did you mean" not in err and len(err.strip().splitlines()) == 1
    for wrong in (kit_toml, fed.certs.root / "admin.toml"):  # admin.toml: "crl: Field required"
        with pytest.raises(ConfigError, match=r"is a hospital's or the administrator's "
                           r"settings file, not the server's: give server\.toml"):
            config.load(wrong, config.ServerSettings)


def test_a_settings_file_saved_with_a_byte_order_mark_is_read(fed: Federation) -> None:
    """Some Windows editors start a UTF-8 file with a byte-order mark; it was refused as
    "Invalid statement (at line 1, column 1)" though the file looked right."""
    kit_toml = fed.certs.kit("a") / "hospital.toml"
    plain = config.load(kit_toml, config.ClientSettings)
    kit_toml.write_bytes(b"\xef\xbb\xbf" + kit_toml.read_bytes())
    assert config.load(kit_toml, config.ClientSettings) == plain


def test_a_ca_setting_that_is_no_certificate_and_a_foreign_crl_name_the_file(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """Walking it: ``ca`` pointing at a key file said only "not a readable X.509
    certificate", and another federation's crl.pem "the revocation list was not signed by
    this federation's CA", neither naming the file nor what to do."""
    from securefl.certs import CertDir

    settings = fed.server_settings()
    kit_toml = fed.certs.kit("a") / "hospital.toml"
    data = config.read_toml(kit_toml)

    async def status(port: int) -> None:
        async with HospitalSession(config.load(kit_toml, config.ClientSettings)
                                   .model_copy(update={"host": "127.0.0.1", "port": port})):
            pass

    other = CertDir(fed.tmp / "other")
    other.init(["127.0.0.1"], ["x"])

    async def scenario() -> list[str]:
        said = []
        async with running(settings) as srv:
            for change in ({"ca": data["key"]}, {"crl": str(other.root / "crl.pem")}):
                config.write_toml(kit_toml, {**data, **change})
                with pytest.raises(SecureFLError) as err:
                    await status(srv.port)
                said.append(err.value.message)
        return said

    from securefl.errors import SecureFLError

    key_as_ca, foreign_crl = asyncio.run(scenario())
    assert "is not a readable X.509 certificate: it should be the federation's CA " \
           "certificate (ca.pem in the kit)" in key_as_ca and data["key"] in key_as_ca, \
        key_as_ca
    assert str(other.root / "crl.pem") in foreign_crl and "replace it with the crl.pem of " \
           "this federation" in foreign_crl, foreign_crl


def test_ml_settings_without_their_table_header_are_named_as_such(
        fed: Federation, tmp_path: Path) -> None:
    """Walking it, a hospital.toml whose ``[ml]`` line was lost listed 13 "not a setting
    securefl knows" clauses (one was "scans_dir: did you mean state_dir?")."""
    data = config.read_toml(fed.certs.kit("a") / "hospital.toml")
    ml = data.pop("ml", None) or {"scans_dir": "scans", "model_dir": "model"}
    bad = config.write_toml(tmp_path / "hospital.toml", {**data, **ml})
    with pytest.raises(ConfigError) as err:
        config.load(bad, config.ClientSettings)
    assert "outside the [ml] table: put the line [ml] above them" in err.value.message
    assert "epochs" in err.value.message and "did you mean" not in err.value.message


@pytest.mark.parametrize("action", [["status"], ["log"], ["send"]])
def test_hospital_naming_another_kit_is_refused_before_anything_runs(
        fed: Federation, capsys: pytest.CaptureFixture[str], action: list[str]) -> None:
    """``--hospital`` was read only by the app: a script running ``--hospital b send`` with
    a's kit sent as a without a word.  Every action now checks it first, as sign-in does."""
    kit = fed.certs.kit("a") / "hospital.toml"
    state = sorted(p.name for p in kit.parent.rglob("*"))
    assert main(["client", "--config", str(kit), "--hospital", "b", *action]) == 3
    err = capsys.readouterr().err
    assert err.strip() == (f"securefl: {kit}'s certificate belongs to 'a', not 'b' "
                           "(--hospital): check the name, or give your own hospital's "
                           "hospital.toml; nothing was done")
    assert sorted(p.name for p in kit.parent.rglob("*")) == state  # nothing written
    # The right name changes nothing: the action runs (its log, empty so far).
    assert main(["client", "--config", str(kit), "--hospital", "a", "log"]) == 0


def test_the_operators_certs_folder_as_config_names_every_settings_file_in_it(
        fed: Federation) -> None:
    """``server --config certs`` was pointed to certs/admin.toml, the first file found."""
    import subprocess
    import sys

    root = fed.certs.root
    # Its own process: the server command may re-execute itself (OpenSSL settings).
    done = subprocess.run([sys.executable, "-m", "securefl", "server", "--config", str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    err = done.stderr
    assert f"{root} is a folder, not a settings file: give the one this command needs: " in err
    assert str(root / "server.toml") in err and str(root / "admin.toml") in err


@pytest.mark.parametrize("action", ["train", "evaluate", "log", "status"])
def test_the_administrators_file_given_to_a_local_hospital_action_says_whose_it_is(
        fed: Federation, capsys: pytest.CaptureFixture[str], action: str) -> None:
    """Walking it: `client --config admin.toml train` was told to add an [ml] table to the
    administrator's file.  The certificate is read first, with no server needed."""
    admin_toml = fed.certs.root / "admin.toml"
    assert main(["client", "--config", str(admin_toml), action]) == 3
    err = capsys.readouterr().err
    assert (f"{admin_toml} holds the administrator's certificate, not a hospital's: "
            "`securefl client` takes a hospital kit's hospital.toml") in err, err
    assert "table" not in err and len(err.strip().splitlines()) == 1  # not "add [ml]"


def test_a_hospitals_file_given_to_admin_says_whose_it_is_without_a_server(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    kit_toml = fed.certs.kit("a") / "hospital.toml"
    assert main(["admin", "--config", str(kit_toml), "status"]) == 3  # no server running
    err = capsys.readouterr().err
    assert (f"{kit_toml} holds the certificate of hospital 'a', not the administrator's: "
            f"`securefl admin` takes the administrator's admin.toml") in err, err
    assert f"securefl client --config {kit_toml}" in err
