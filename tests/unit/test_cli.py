import subprocess
import sys

from securefl import errors
from securefl.cli import EXIT_CODES, exit_code_for, main


def test_demo_runs_and_reports_within_bound(capsys):
    assert main(["demo", "--hospitals", "6", "--params", "5000", "--dropout", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "documented bound" in out and "-> OK" in out
    assert "will disconnect" in out


def test_demo_refuses_too_few_hospitals(capsys):
    assert main(["demo", "--hospitals", "2"]) == 2
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
