"""Server-driven rounds (``[schedule] mode = "auto"``, issue 17) over real mutual TLS.

The hospitals here are real ``HospitalSession`` clients that do what the hospital agent does
with a scheduled round: wait for ``round_open`` (or find it in ``welcome.schedule``), download
its base version, send a known update; nobody runs ``aggregate``.  Every published version is
checked against what the hospitals' own updates imply (``tests/outcome.py``).
"""

from __future__ import annotations

import asyncio

import numpy as np

from securefl import config
from securefl.client.session import HospitalSession, RoundOutcome
from securefl.protocol import messages as wm
from securefl.server.audit import read_entries
from securefl.server.store import ModelStore
from tests import outcome

from .conftest import Federation, running

D = 1000


def auto(fed: Federation, *, every: str = "after-publish", deadline: str = "20s",
         start: str = "running", hospitals: tuple[str, ...] = ("a", "b", "c"),
         **round_settings: object) -> config.ServerSettings:
    rs = {"step_timeout": 10.0, **round_settings}
    return fed.server_settings(
        hospitals=list(hospitals), round=config.RoundSettings(**rs),  # type: ignore[arg-type]
        schedule=config.ScheduleSettings(mode="auto", every=every, training_deadline=deadline,
                                         start=start))  # type: ignore[arg-type]


def updates(n: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, D).astype(np.float32) for _ in range(n)]


async def next_open(h: HospitalSession, timeout: float = 20.0,
                    after: int = 0) -> wm.RoundOpen | wm.OpenRound:
    """The scheduled round open now (from the welcome or a push) numbered above ``after``."""
    sched = h.schedule
    if sched is not None and sched.open_round is not None and \
            sched.open_round.schedule_round > after:
        return sched.open_round
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        msg = await h.next_schedule_event(max(0.01, end - loop.time()))
        if isinstance(msg, wm.RoundOpen) and msg.schedule_round > after:
            return msg


async def next_closed(h: HospitalSession, number: int, timeout: float = 30.0
                      ) -> wm.RoundClosed:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        msg = await h.next_schedule_event(max(0.01, end - loop.time()))
        if isinstance(msg, wm.RoundClosed) and msg.schedule_round == number:
            return msg


async def take_part(h: HospitalSession, update: np.ndarray, samples: int,
                    after: int = 0) -> tuple[int, RoundOutcome | None]:
    """What an agent does with one scheduled round: train on its base, join, send."""
    opened = await next_open(h, after=after)
    model = await h.get_global()
    assert model.version == opened.base_version
    return opened.schedule_round, await h.send(update, samples)


def events(settings: config.ServerSettings, name: str) -> list[dict]:
    return [e for e in read_entries(settings.audit_log) if e["event"] == name]


def test_auto_schedule_publishes_without_any_admin_action(fed: Federation) -> None:
    """(a) after-publish, three hospitals with known updates: two versions are published
    with no administrator, each equal to the hospitals' weighted mean through FedAvgM."""
    settings = auto(fed)
    samples = [10, 30, 60]
    first, second = updates(3, seed=1), updates(3, seed=2)

    async def main() -> list[tuple[int, RoundOutcome | None]]:
        async with running(settings) as srv:
            sessions = [HospitalSession(fed.client_settings(n, srv.port)) for n in "abc"]
            for h in sessions:
                await h.connect()
            try:
                one = await asyncio.gather(*(take_part(h, u, n) for h, u, n in
                                             zip(sessions, first, samples, strict=True)))
                closed = await asyncio.gather(*(next_closed(h, 1) for h in sessions))
                assert {(c.outcome, c.version) for c in closed} == {("published", 1)}
                # after-publish: the next round opens by itself on version 1.
                two = await asyncio.gather(*(take_part(h, u, n, after=1) for h, u, n in
                                             zip(sessions, second, samples, strict=True)))
            finally:
                for h in sessions:
                    await h.close()
            return [*one, *two]

    results = asyncio.run(main())
    assert [(r, o.version if o else None) for r, o in results] == [(1, 1)] * 3 + [(2, 2)] * 3
    store = ModelStore(settings.store_dir)
    w0, w1, w2 = (store.read(v)[1] for v in (0, 1, 2))
    mean1 = outcome.weighted_mean(list(zip(first, samples, strict=True)))
    expected1, momentum = outcome.fedavgm_step(w0, mean1, None)
    outcome.assert_published(w1, expected1, outcome.tolerance(list(zip(first, samples,
                                                                         strict=True))), w0)
    mean2 = outcome.weighted_mean(list(zip(second, samples, strict=True)))
    expected2, _ = outcome.fedavgm_step(w1, mean2, momentum)
    outcome.assert_published(w2, expected2, 2 * outcome.tolerance(
        list(zip(second, samples, strict=True))), w1)
    assert not any(e.get("action") == "aggregate" for e in events(settings, "admin"))
    opened = events(settings, "schedule-open")
    assert [(e["schedule_round"], e["base_version"]) for e in opened[:2]] == [(1, 0), (2, 1)]
    assert [(e["schedule_round"], e["outcome"], e["version"])
            for e in events(settings, "schedule-closed")[:2]] == [(1, "published", 1),
                                                                  (2, "published", 2)]
