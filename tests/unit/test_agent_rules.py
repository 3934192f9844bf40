"""The hospital's [agent] settings and the rules the agent follows before it trains or sends.

Pure rules on real files (the agent's record, the real send record): no server.  Each rule
is checked at its edge, so a rule that stopped working fails here.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.client.agent import rules
from securefl.client.agent.rules import AgentRecord, RoundEntry
from securefl.client.outbox import Outbox
from securefl.errors import ConfigError, UpdateAlreadySentError

KIT = {"cert": "h.pem", "key": "h.key", "ca": "ca.pem"}


def load_agent(tmp_path: Path, table: dict[str, object]) -> config.AgentSettings:
    path = config.write_toml(tmp_path / "hospital.toml", {**KIT, "agent": table})
    return config.load(path, config.ClientSettings).agent


def test_defaults_ask_a_person_and_allow_any_time(tmp_path: Path) -> None:
    agent = load_agent(tmp_path, {})
    assert agent.participation == "approve"
    assert agent.window is None and rules.in_window(agent, datetime(2024, 1, 1, 3, 0))


@pytest.mark.parametrize(("table", "said"), [
    ({"participation": "always"}, "agent.participation: Input should be 'approve' or 'auto'"),
    ({"window": "10pm-6am"}, "window '10pm-6am' is not a local time range like"),
    ({"window": "22:00-24:00"}, "is not a local time range"),
    ({"window": "06:00-06:00"}, "starts and ends at the same time"),
    ({"max_rounds_per_day": 0}, "agent.max_rounds_per_day: Input should be greater than or "
     "equal to 1"),
    ({"max_attempts_per_version": -1}, "agent.max_attempts_per_version"),
    ({"keepalive": 0}, "agent.keepalive"),
    ({"participate": "auto"}, "agent.participate: not a setting securefl knows (did you "
     "mean participation?)"),
], ids=lambda v: str(v)[:30])
def test_bad_agent_settings_are_refused_in_one_sentence_naming_the_field(
        tmp_path: Path, table: dict[str, object], said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent(tmp_path, table)
    message = caught.value.message
    assert said in message and str(tmp_path / "hospital.toml") in message
    assert "\n" not in message


@pytest.mark.parametrize(("window", "inside", "outside"), [
    ("22:00-06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"]),
    ("09:30-17:00", ["09:30", "16:59"], ["09:29", "17:00", "23:00"]),
])
def test_the_window_is_local_time_and_may_cross_midnight(
        window: str, inside: list[str], outside: list[str]) -> None:
    agent = config.AgentSettings(window=window)

    def at(hhmm: str) -> datetime:
        h, m = map(int, hhmm.split(":"))
        return datetime(2024, 3, 5, h, m)

    assert all(rules.in_window(agent, at(t)) for t in inside)
    assert not any(rules.in_window(agent, at(t)) for t in outside)
    refused = rules.refusal(agent, AgentRecord(Path("unused")), 0, at(outside[0]))
    assert refused is not None and refused[0] == "window"
    assert f"outside the agent's window {window}" in refused[1]


def test_daily_limit_counts_rounds_started_today_only(tmp_path: Path) -> None:
    agent = config.AgentSettings(max_rounds_per_day=2, max_attempts_per_version=10)
    record = AgentRecord.load(tmp_path)
    today, now = "2024-03-05", datetime(2024, 3, 5, 23, 0)
    record.put(RoundEntry(1, 0, day="2024-03-04", outcome="published"))  # yesterday
    record.put(RoundEntry(2, 1, day=today, outcome="published"))
    record.put(RoundEntry(3, 2, outcome="declined", reason="declined"))  # never started
    assert rules.refusal(agent, record, 3, now) is None
    record.put(RoundEntry(4, 2, day=today, outcome="failed", reason="training-error"))
    refused = rules.refusal(agent, AgentRecord.load(tmp_path), 3, now)  # read back from disk
    assert refused is not None and refused[0] == "daily-limit"
    assert "already took part in 2 round(s) today" in refused[1]
    # The next day the count starts again.
    assert rules.refusal(agent, record, 3, datetime(2024, 3, 6, 0, 1)) is None


def test_attempt_limit_counts_rounds_started_on_that_version(tmp_path: Path) -> None:
    agent = config.AgentSettings(max_attempts_per_version=2, max_rounds_per_day=100)
    record = AgentRecord.load(tmp_path)
    now = datetime(2024, 3, 5, 12, 0)
    record.put(RoundEntry(1, 7, day="2024-03-05", outcome="abandoned"))
    record.put(RoundEntry(2, 7, outcome="declined"))  # skipped: not an attempt
    assert rules.refusal(agent, record, 7, now) is None
    record.put(RoundEntry(3, 7, day="2024-03-05", outcome="interrupted"))
    refused = rules.refusal(agent, record, 7, now)
    assert refused is not None and refused[0] == "attempt-limit"
    assert "already tried 2 round(s) on version 7" in refused[1]
    assert rules.refusal(agent, record, 8, now) is None  # a new version starts afresh


def test_a_round_left_started_by_a_killed_agent_counts_as_interrupted(tmp_path: Path) -> None:
    record = AgentRecord.load(tmp_path)
    record.put(RoundEntry(5, 3, day="2024-03-05"))  # the agent died here
    again = AgentRecord.load(tmp_path)
    assert [e.schedule_round for e in again.interrupted()] == [5]
    entry = AgentRecord.load(tmp_path).entry(5)
    assert entry is not None and entry.outcome == "interrupted" and entry.started
    assert AgentRecord.load(tmp_path).attempts_on(3) == 1


def test_the_record_is_replaced_whole_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    record = AgentRecord.load(tmp_path)
    record.put(RoundEntry(1, 0, day="2024-03-05", outcome="published", version=1,
                          balanced_accuracy=0.5))
    assert not list(tmp_path.glob("*.tmp"))
    assert json.loads((tmp_path / "agent.json").read_text())["rounds"][0]["version"] == 1
    (tmp_path / "agent.json").write_text('{"rounds": [{"schedule_')
    from securefl.errors import DataError

    with pytest.raises(DataError, match=r"agent\.json is damaged"):
        AgentRecord.load(tmp_path)


def _journal_until(outbox: Outbox, base: int, update: np.ndarray, stage: str,
                   round_id: int = 11) -> None:
    journal, _ = outbox.begin(base, 40, update, max_attempts=3)
    journal("joined", round_id)
    if stage == "joined":
        return
    journal("masked-input", round_id, others_can_sign=False)
    if stage == "published":
        journal("published", round_id, base + 1)


def test_cross_round_rule_nothing_left_means_a_new_update(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    assert rules.cross_round(outbox, 4) is None  # no record
    _journal_until(outbox, 4, np.ones(10, np.float32), "joined")
    assert rules.cross_round(outbox, 4) is None  # joined but nothing left: train anew
    assert rules.cross_round(outbox, 5) is None  # another version


def test_cross_round_rule_a_published_or_pending_update_is_never_followed(
        tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    _journal_until(outbox, 4, np.ones(10, np.float32), "masked")
    with pytest.raises(UpdateAlreadySentError, match="already left in round 11"):
        rules.cross_round(outbox, 4)
    _journal_until(Outbox(tmp_path / "c"), 4, np.ones(10, np.float32), "published")
    with pytest.raises(UpdateAlreadySentError, match="already in global version 5"):
        rules.cross_round(Outbox(tmp_path / "c"), 4)


def test_cross_round_rule_after_an_abandon_only_the_same_update_goes_again(
        tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    update = np.linspace(-0.1, 0.1, 10).astype(np.float32)
    _journal_until(outbox, 4, update, "masked")
    outbox.note_abandoned(11)  # t > n - 1: the others could not sign a list without it
    resend = rules.cross_round(outbox, 4)
    assert resend is not None and resend.samples == 40
    np.testing.assert_array_equal(resend.update, update)
    # The kept update gone: nothing goes out on that version any more.
    (tmp_path / "sent" / "v00000004.npy").unlink()
    with pytest.raises(UpdateAlreadySentError, match="no longer kept"):
        rules.cross_round(outbox, 4)


def test_pending_counts_split_as_training_does() -> None:
    counts = rules.pending_counts({"Training": {"glioma": 40, "notumor": 6, "pituitary": 0},
                                   "Testing": {"glioma": 5}}, 0.15, 5)
    assert counts == {"train": {"glioma": 34, "notumor": 1, "pituitary": 0},
                      "validation": {"glioma": 6, "notumor": 5, "pituitary": 0}}


ROOT = Path(__file__).resolve().parents[2]


def test_the_service_unit_and_the_quickstart_say_what_the_code_does() -> None:
    unit = (ROOT / "deploy" / "securefl-agent@.service").read_text()
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1]
             for line in unit.splitlines() if "=" in line and not line.startswith("#")}
    assert lines["User"] == "securefl" and lines["Restart"] == "on-failure"
    assert lines["ExecStart"].endswith("securefl client --config "
                                       "/var/lib/securefl/%i/hospital.toml agent")
    assert lines["KillSignal"] == "SIGTERM"
    quick = (ROOT / "docs" / "QUICKSTART.md").read_text()
    assert "deploy/securefl-agent@.service" in quick
    table = "[" + "agent]\n"  # (the docs' block, not a settings file built here)
    block = quick.split(table, 1)[1].split("```", 1)[0]
    keys = {line.split("=")[0].strip("# ").strip() for line in block.splitlines()
            if "=" in line.split("#", 1)[0] or line.startswith("# window")}
    assert keys == set(config.AgentSettings.model_fields), keys
    for code in (14, 15):
        assert f"\n| {code} |" in quick
    from securefl.cli import EXIT_CODES
    from securefl.errors import AgentRunningError, AgentUnavailableError

    assert (EXIT_CODES[AgentRunningError], EXIT_CODES[AgentUnavailableError]) == (14, 15)
    for reason in rules.REASONS:
        assert f"`{reason}`" in quick


def test_agent_lines_carry_the_time_outside_the_journal(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A log file (``agent >> agent.log``, the demo's agent.log) is read after the fact: each
    line says when; under systemd the journal stamps lines itself, so no second time."""
    import re

    from securefl.client.agent.service import _say_default

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    _say_default("agent: server opened round 4 on version 3")
    line = capsys.readouterr().err
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d agent: server opened round 4 on "
                        r"version 3\n", line), line
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    _say_default("agent: stopped")
    assert capsys.readouterr().err == "agent: stopped\n"
