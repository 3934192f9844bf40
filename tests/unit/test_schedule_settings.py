"""``[schedule]`` in server.toml and the schedule's wire messages (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from securefl import config
from securefl.errors import ConfigError, RemoteProtocolError
from securefl.protocol import messages as wm
from securefl.protocol.frames import Frame


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("15m", 900), ("24h", 86400),
                                                ("2d", 172800), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "24", "h", "0s", "-1h", "1w", "tomorrow", "1h30m"])
def test_bad_durations_say_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match='like "30s", "15m", "24h" or "2d"'):
        config.parse_duration(text, "every")


def test_manual_is_the_default_and_after_publish_has_no_interval() -> None:
    s = config.ScheduleSettings()
    assert (s.mode, s.every, s.training_deadline, s.start) == ("manual", "24h", "2h",
                                                               "running")
    assert s.interval == 86400 and s.deadline == 7200
    assert config.ScheduleSettings(every="after-publish").interval is None


def _server_toml(tmp_path: Path, schedule: dict[str, str]) -> Path:
    return config.write_toml(tmp_path / "server.toml", {
        "cert": "s.pem", "key": "s.key", "ca": "ca.pem", "crl": "crl.pem",
        **({"schedule": schedule} if schedule else {})})


@pytest.mark.parametrize(("body", "words"), [
    ({"mode": "auto", "every": "daily"}, "every = 'daily' is not a duration"),
    ({"mode": "auto", "training_deadline": "0m"}, "training_deadline = '0m' is not a duration"),
    ({"mode": "sometimes"}, "schedule.mode"),
    ({"mode": "auto", "start": "later"}, "schedule.start"),
    ({"mode": "auto", "evry": "1h"}, "schedule.evry"),
])
def test_bad_schedule_settings_stop_the_server_with_one_sentence(
        tmp_path: Path, body: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(_server_toml(tmp_path, body), config.ServerSettings)
    assert words in refused.value.message and "\n" not in refused.value.message


def test_a_good_schedule_loads(tmp_path: Path) -> None:
    s = config.load(_server_toml(tmp_path, {"mode": "auto", "every": "after-publish",
                                            "training_deadline": "30m", "start": "paused"}),
                    config.ServerSettings)
    assert s.schedule.mode == "auto" and s.schedule.deadline == 1800
    assert config.load(_server_toml(tmp_path, {}), config.ServerSettings).schedule.mode == \
        "manual"


def _decode(header: bytes) -> wm.Message:
    return wm.decode(Frame(header, b""))[0]


def test_schedule_messages_round_trip() -> None:
    opened = wm.RoundOpen(schedule_round=3, base_version=2, opened="2025-01-01T00:00:00+00:00",
                          deadline="2025-01-01T02:00:00+00:00")
    for msg in [opened, wm.RoundClosed(schedule_round=3, outcome="expired"),
                wm.Keepalive(rid=4), wm.TrainingFailed(rid=5, schedule_round=3,
                                                       reason="out-of-memory"),
                wm.AdminCommand(rid=6, action="open"), wm.AdminQuery(rid=7, what="schedule"),
                wm.Welcome(rid=1, name="a", role="hospital", version=2,
                           schedule=wm.WelcomeSchedule(paused=True, open_round=opened.info()))]:
        assert _decode(wm.encode_header(msg)) == msg


@pytest.mark.parametrize("header", [
    # a count of the hospital's data smuggled in, an unknown reason, round 0
    b'{"kind":"training_failed","rid":1,"schedule_round":1,"reason":"too-few-scans",'
    b'"scans":3}',
    b'{"kind":"training_failed","rid":1,"schedule_round":1,"reason":"only 3 scans"}',
    b'{"kind":"training_failed","rid":1,"schedule_round":0,"reason":"no-scans"}',
    b'{"kind":"round_closed","rid":0,"schedule_round":1,"outcome":"maybe"}',
    b'{"kind":"keepalive","rid":1,"extra":true}',
    b'{"kind":"admin_query_reply","rid":1,"what":"schedule","schedule":{"mode":"auto",'
    b'"paused":false,"every":"1h","training_deadline":"1h","round":{"schedule_round":1,'
    b'"base_version":0,"opened":"x","deadline":"y","phase":"enrolling",'
    b'"hospitals":{"a":"failed: 12 scans"}}}}',
])
def test_schedule_messages_are_strict(header: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as refused:
        _decode(header)
    assert refused.value.code == "bad-message"
