import subprocess
import sys

from securefl import errors
from securefl.cli import EXIT_CODES, exit_code_for, main


def test_demo_runs_and_reports_within_bound(capsys):
    argv = ["demo", "--secagg-only", "--hospitals", "6", "--params", "5000", "--dropout", "0.3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "documented bound" in out and "-> OK" in out
    assert "will disconnect" in out


def test_the_secagg_demo_as_the_readme_gives_it_finishes_with_hospitals_leaving(capsys):
    """`securefl demo --secagg-only` with no options printed "threshold 2 of 3", dropped a
    hospital and failed: the round it ran needed all three (one colluder assumed)."""
    from securefl.demo.secagg import DEFAULT_HOSPITALS

    assert main(["demo", "--secagg-only", "--params", "2000"]) == 0
    out = capsys.readouterr().out
    assert f"{DEFAULT_HOSPITALS} simulated hospitals" in out
    # 6 hospitals, one colluder: floor((6 + 1) / 2) + 1 = 4 (Bonawitz et al. 2017, section 6)
    assert "threshold 4 of 6" in out
    assert out.count("will disconnect") == 2 and "-> OK" in out
    assert f"with --secagg-only {DEFAULT_HOSPITALS})" in " ".join(
        subprocess.run([sys.executable, "-m", "securefl.cli", "demo", "--help"],
                       capture_output=True, text=True).stdout.split())


def test_a_secagg_demo_too_small_to_lose_anyone_says_so(capsys):
    assert main(["demo", "--secagg-only", "--hospitals", "3", "--params", "2000"]) == 0
    out = capsys.readouterr().out
    assert "threshold 3 of 3" in out and "will disconnect" not in out
    assert "dropout 0.3 would lose 1 hospital(s), but the round needs 3 of 3:\n  0 will leave" \
        in out
    assert "-> OK" in out


def test_the_secagg_demo_fits_an_80_column_terminal(capsys):
    """Its "largest difference" line was 84 columns, its dropout note up to 82."""
    for argv in (["--params", "2000"], ["--hospitals", "3", "--params", "2000"],
                 ["--hospitals", "12", "--params", "2000", "--dropout", "0.9"]):
        assert main(["demo", "--secagg-only", *argv]) == 0
        out = capsys.readouterr().out
        assert [line for line in out.splitlines() if len(line) > 80] == [], argv


def test_demo_refuses_too_few_hospitals(capsys):
    assert main(["demo", "--secagg-only", "--hospitals", "2"]) == 2
    assert "at least 3" in capsys.readouterr().err


def test_exit_codes_are_distinct_and_most_specific_wins():
    assert len(set(EXIT_CODES.values())) == len(EXIT_CODES)
    assert exit_code_for(errors.NotEnoughSurvivorsError("x")) == 8
    assert exit_code_for(errors.RemoteProtocolError("x")) == 7
    assert exit_code_for(errors.ConfigError("x")) == 3


def test_console_script_help_is_fast_and_clean():
    out = subprocess.run([sys.executable, "-m", "securefl.cli", "--help"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout


def test_client_and_admin_without_an_action_open_the_apps():
    """No ACTION means the TUI (imported lazily); an action without --config is refused."""
    from securefl.cli import build_parser

    parser = build_parser()
    client = parser.parse_args(["client", "--config", "h.toml", "--hospital", "x"])
    assert client.client_action is None and client.func.__name__ == "run_app"
    admin = parser.parse_args(["admin", "--config", "a.toml"])
    assert admin.action is None
    assert parser.parse_args(["admin", "--config", "a.toml", "history"]).action == "history"
    out = subprocess.run([sys.executable, "-m", "securefl", "client", "status"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "needs --config" in out.stderr


def test_apps_without_a_terminal_say_so_and_exit_2():
    """Issue 16 item 12: ``admin`` with no ACTION on a pipe started the full-screen app and
    hung; now it says what to give instead (the client the same)."""
    for command in (["admin", "--config", "a.toml"], ["client", "--config", "h.toml"]):
        try:
            out = subprocess.run([sys.executable, "-m", "securefl", *command],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"securefl {command[0]} hung without a terminal") from None
        assert out.returncode == 2, out
        err = out.stderr.strip()
        assert "\n" not in err and "this is not a terminal" in err and "give an ACTION" in err
        assert ("status" in err) and (command[0] != "admin" or "aggregate" in err)
        if command[0] == "client":  # the agent's actions too (a walk found them missing)
            assert "agent, agent-status, approve, skip, agent-stop" in err, err


def test_admin_tables_align_numbers_right_and_text_left():
    from securefl.client import admin_text
    from securefl.client.session import AuditEntry, VersionEntry

    lines = admin_text.history_lines([
        VersionEntry(9, "2025-03-01T14:05:09+00:00", 3, 1200, "ab" * 32),
        VersionEntry(10, "2025-03-08T14:05:09+00:00", 12, 48000, "cd" * 32)])
    assert lines == [
        "version  published (UTC)      hospitals  scans  sha256 (first 16)",
        "      9  2025-03-01 14:05:09          3   1200  abababababababab",
        "     10  2025-03-08 14:05:09         12  48000  cdcdcdcdcdcdcdcd"]
    audit = admin_text.audit_lines([AuditEntry(7, "2025-03-01T14:05:09.120+00:00", "join",
                                               "north", "round_id=3")])
    assert audit[1] == "  7  2025-03-01 14:05:09  join   north  round_id=3"


def _walk(parser, path=("securefl",)):
    """Every (command path, parser) under ``parser``, depth first."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{' '.join(path)} {name} has no help line"
                yield from _walk(sub, (*path, name))


def test_every_option_has_help_that_shows_its_default():
    """Issue 16 item 14: every option and argument of every command says what it is, and
    where it has a default, the help shows it (``--port`` had neither)."""
    import argparse

    from securefl.cli import build_parser

    problems = []
    for path, parser in _walk(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{name}: no help")
                continue
            shown = formatter._expand_help(action)
            default = action.default
            if default is None or default is False or isinstance(action,
                                                                 argparse._StoreTrueAction):
                continue
            if str(default) not in shown or "default" not in shown:
                problems.append(f"{name}: default {default!r} not in help {shown!r}")
    assert not problems, "\n".join(problems)


def test_the_port_default_is_the_one_certs_uses():
    from securefl import certs, cli

    assert cli.DEFAULT_PORT == certs.DEFAULT_PORT


def test_certs_init_says_where_the_kits_connect_and_what_to_start(tmp_path, capsys):
    """Walking the QuickStart with '--server-host fl.example.org,127.0.0.1' (the docs'
    example) gave kits for a name that resolved nowhere and nothing said so: the output
    now names the host and port every kit was written with."""
    certs = tmp_path / "certs"
    assert main(["certs", "--dir", str(certs), "init", "--server-host",
                 "fl.example.org,127.0.0.1", "--hospitals", "north,south,east",
                 "--port", "9444"]) == 0
    out = capsys.readouterr().out
    assert (f"the kits and admin.toml connect to fl.example.org:9444: start `securefl server "
            f"--config {certs / 'server.toml'}` on the machine that name reaches") in out
    from securefl.config import read_toml

    kit = read_toml(certs / "kits" / "north" / "hospital.toml")
    assert (kit["host"], kit["port"]) == ("fl.example.org", 9444)


def test_output_cut_short_by_the_reader_is_no_error(tmp_path, monkeypatch, capsys) -> None:
    """``securefl admin status | head`` ended in a BrokenPipeError traceback (walking it):
    the reader going away is not an error, and nothing is printed about it."""
    import io

    class ClosedPipe(io.TextIOBase):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise io.UnsupportedOperation("no descriptor here")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["certs", "--dir", str(tmp_path / "certs"), "init", "--server-host",
                 "127.0.0.1", "--hospitals", "a,b,c"]) == 0
    assert capsys.readouterr().err == ""
