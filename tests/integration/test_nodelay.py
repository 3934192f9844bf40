"""The server's connections send each small message at once.

asyncio switches Nagle's algorithm off only for sockets that report ``proto`` TCP, and a
socket from ``accept`` reports 0; the server then held every push that followed one of its
replies (roster, share envelopes, survivor list, unmask request) until the hospital's
delayed ACK, 20-40 ms per protocol step (``bench/round_bench.py``, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys

import pytest

from securefl.client.session import AdminSession

from .conftest import Federation, running

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="finds the server's socket through /proc/self/fd")


def _server_side_of(client: tuple[str, int]) -> socket.socket:
    """The in-process server's socket whose peer is ``client`` (a duplicate to inspect)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:  # the descriptor of the listing itself, closed by now
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            continue
        with contextlib.suppress(OSError):
            if sock.family == socket.AF_INET and sock.getpeername() == client:
                return sock
        sock.close()
    raise AssertionError(f"no server socket connected to {client}")


def test_the_server_sends_small_messages_without_waiting_for_acks(fed: Federation) -> None:
    async def scenario() -> None:
        async with running(fed.server_settings()) as srv, \
                AdminSession(fed.client_settings("admin", srv.port)) as admin:
            assert await admin.version() == 0
            here = admin.conn._writer.get_extra_info("sockname")
            sock = _server_side_of((here[0], here[1]))
            try:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                sock.close()

    asyncio.run(scenario())
