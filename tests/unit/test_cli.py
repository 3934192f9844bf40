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
