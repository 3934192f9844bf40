"""The join race (issue 14, item 9): enrolment closes between a hospital's ``join`` and its
``advertise``.  The join got ``joined``; the keys arrive for a round whose roster is fixed.
The hospital must hear why, in its own code (``enrolment-closed``), not ``not-joined``,
and nothing of its update may have been used; the round goes on without it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from securefl import config
from securefl.client.session import AdminSession, HospitalSession, RoundStep
from securefl.errors import ProtocolError

from .conftest import Federation, running

D = 1000


def test_keys_that_arrive_after_enrolment_closed_get_their_own_code(fed: Federation) -> None:
    settings = fed.server_settings(hospitals=["a", "b", "c", "d"],
                                   round=config.RoundSettings(enrolment_timeout=60))

    async def scenario() -> None:
        async with running(settings) as srv:
            coord = srv.coordinator

            async def send(name: str, on_step: object = None) -> object:
                async with HospitalSession(fed.client_settings(name, srv.port)) as h:
                    await h.get_global()
                    return await h.send(np.full(D, 0.01, np.float32), 10,
                                        on_step=on_step)  # type: ignore[arg-type]

            first = [asyncio.create_task(send(n)) for n in "abc"]
            async with asyncio.timeout(30):
                while coord.round is None or len(coord.round.engine.joined) < 3:
                    await asyncio.sleep(0.02)

            def close_when_d_joined(step: RoundStep) -> None:
                # d has its `joined`, its keys are not sent yet: enrolment closes now
                # (what the admin's `close` or the enrolment deadline does).
                if step.name == "joined":
                    coord._close_enrolment(coord.round)

            with pytest.raises(ProtocolError) as late:
                await send("d", close_when_d_joined)
            assert late.value.code == "enrolment-closed"
            assert "closed its enrolment before this hospital's keys arrived" in \
                late.value.message
            assert "join the next round" in late.value.message

            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                async with asyncio.timeout(30):
                    while await admin.count() < 3:
                        await asyncio.sleep(0.05)
                result = await admin.aggregate()
            assert result.contributors == 3  # the round went on without d
            assert all(o.version == 1 for o in await asyncio.gather(*first))  # type: ignore[attr-defined]

    asyncio.run(scenario())
