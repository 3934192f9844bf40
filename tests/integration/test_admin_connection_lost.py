"""``admin aggregate`` when the server dies mid-round (issue 14, item 15): the admin hears one
sentence, and no task of its session is left with an exception nobody retrieved (asyncio's
"Task exception was never retrieved" with a traceback on the admin's terminal).

Why the scripted server (``tests/malicious_server.py``): the race needs the server to push
an unmask-progress message and hang up at once, which a killed real server does only
sometimes; a script does it every time, over real mutual TLS, against the real session.
"""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from securefl.client.session import AdminSession
from securefl.errors import TransportError
from securefl.protocol import messages as wm
from tests.malicious_server import ScriptedServer

from .conftest import Federation

TRIES = 10


@pytest.mark.parametrize("when", ["before aggregate", "after a progress push"])
def test_a_server_dying_during_aggregate_leaves_no_unretrieved_task(
        fed: Federation, when: str) -> None:
    """Gone before the request (an admin app's session outliving the server), or right
    after telling the admin how many hospitals answered the unmask step."""

    async def once(server: ScriptedServer, nth: int) -> tuple[str, list[str]]:
        loop = asyncio.get_running_loop()
        leaked: list[str] = []
        loop.set_exception_handler(lambda _, ctx: leaked.append(ctx.get("message", "")))
        settings = fed.client_settings("admin", server.port, reply_timeout=10.0)
        async with AdminSession(settings) as admin:
            peer = await server.peer("admin", nth)
            if when == "before aggregate":
                await peer.close()
                await asyncio.sleep(0.2)  # the session has seen the hang-up
                agg = asyncio.create_task(admin.aggregate())
            else:
                agg = asyncio.create_task(admin.aggregate())
                request = await peer.next()
                assert request is not None and isinstance(request[0], wm.AdminCommand)
                await peer.push(wm.AggregateProgress(round_id=1, asked=3, answered=1,
                                                     needed=3))
                await peer.close()  # as when the server is killed
            with pytest.raises(TransportError) as lost:
                await agg
        await asyncio.sleep(0.05)
        gc.collect()  # an unretrieved task exception is reported when the task is freed
        await asyncio.sleep(0)
        return lost.value.message, leaked

    async def scenario() -> None:
        async with ScriptedServer(fed.certs, np.zeros(8, np.float32)) as server:
            for nth in range(1, TRIES + 1):
                said, leaked = await once(server, nth)
                assert not leaked, leaked
                assert "lost during aggregate" in said

    asyncio.run(scenario())
