"""The agent's local socket: how the hospital app and the CLI talk to a running agent.

Why a Unix-domain socket in the state folder: while the agent runs it owns the hospital's
state (it trains and sends on the server's schedule); a second trainer or sender in the
app or a terminal would race it over ``model.keras`` and the send record.  The socket is
how the others learn that an agent is running, ask what it does, and approve or skip a
round — and it is the hospital's own: mode 0600 in ``state_dir``, so only the service user
(and root) can reach it.  Nothing on it leaves the machine.

Protocol: one JSON object per line each way (docs/notes wire17 "Agent local socket"):
``{"op": "status"}``, ``{"op": "approve", "schedule_round": N}``,
``{"op": "skip", "schedule_round": N}``, ``{"op": "history"}``, ``{"op": "stop"}``; replies
``{"ok": true, ...}`` or ``{"ok": false, "error": "<one sentence>"}``.

One agent per state folder: the agent holds an exclusive ``flock`` on ``agent.lock`` for its
whole life (the kernel drops it when the process dies, even on SIGKILL), so a second agent
is refused with the first one's pid, and a socket file left by a killed agent is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from securefl.errors import AgentRunningError, AgentUnavailableError, ConfigError, SecureFLError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

SOCKET_NAME = "agent.sock"
LOCK_NAME = "agent.lock"
#: Longest request line accepted (a request is a few dozen bytes).
MAX_LINE = 64 * 1024
#: How long a client waits for the agent's answer.
TIMEOUT = 10.0
OPS = ("status", "approve", "skip", "history", "stop")


#: A Unix socket's address holds 108 bytes on Linux (104 on macOS), its final NUL included.
ADDRESS_MAX = 100


def socket_path(state_dir: Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """A name the kernel accepts for the socket file ``path``, valid inside the block.

    Why: a Unix socket's address is limited to about a hundred bytes, and a hospital's state
    folder can lie deeper than that (the agent then died at start with "AF_UNIX path too
    long").  Such a path is reached through ``/proc/self/fd/N/agent.sock``, N an open
    handle on the state folder: the same file, a short name.  Where there is no /proc the
    sentence says what to change."""
    text = str(path)
    if len(os.fsencode(text)) <= ADDRESS_MAX:
        yield text
        return
    if not Path("/proc/self/fd").is_dir():
        raise ConfigError(
            f"the hospital's state folder {path.parent} is too long a path for the agent's "
            f"local socket ({len(os.fsencode(text))} bytes with the socket's name; at most "
            f"{ADDRESS_MAX}): set state_dir in hospital.toml to a shorter path")
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class AgentLock:
    """The exclusive hold on one state folder (``agent.lock``), for one agent's life."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock or say which agent does; a stale socket is removed once held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise AgentRunningError(
                    f"another agent (pid {holder}) is already running for this hospital "
                    f"({self.path.parent}): stop it first (`systemctl stop` its service, or "
                    "`securefl client --config hospital.toml agent-stop`)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        stale = socket_path(self.path.parent)
        if stale.exists() or stale.is_symlink():
            stale.unlink()  # the lock was free: whoever made it is gone

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """The agent's end of the socket: each request line goes to ``handler``."""

    def __init__(self, state_dir: Path, handler: Handler) -> None:
        self.path = socket_path(state_dir)
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        old = os.umask(0o177)  # the socket is born 0600, never briefly world-reachable
        try:
            with socket_address(self.path) as address:
                self._server = await asyncio.start_unix_server(self._serve, path=address,
                                                               limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _reply(writer, {"ok": False, "error": "request too long: one JSON "
                                          "object per line, a few hundred bytes at most"})
                    return
                if not line:
                    return
                await _reply(writer, await self._answer(line))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict) or request.get("op") not in OPS:
            return {"ok": False, "error": "not a request this agent knows: send one JSON "
                    f"object per line with op one of {', '.join(OPS)}"}
        if request["op"] in ("approve", "skip") and not isinstance(
                request.get("schedule_round"), int):
            return {"ok": False, "error": f"{request['op']} needs schedule_round, the number "
                    "of the round (status shows the pending one)"}
        try:
            return await self._handler(request)
        except SecureFLError as exc:
            return {"ok": False, "error": exc.message}


async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
    writer.write(json.dumps(reply).encode() + b"\n")
    await writer.drain()


def _not_there(path: Path) -> AgentUnavailableError:
    return AgentUnavailableError(
        f"no agent is running for this hospital (nothing answers on {path}): start it with "
        "`securefl client --config hospital.toml agent` or its service")


async def call(state_dir: Path, op: str, timeout: float = TIMEOUT,
               **fields: Any) -> dict[str, Any]:
    """Ask the running agent (async, for the app); ``AgentUnavailableError`` if none."""
    path = socket_path(state_dir)
    if len(os.fsencode(str(path))) > ADDRESS_MAX:
        # Reaching it through /proc opens the folder, a blocking call: not on the app's
        # event loop (the screen would freeze on a slow disk).
        return await asyncio.to_thread(call_sync, state_dir, op, timeout, **fields)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout)
    except (OSError, TimeoutError):
        raise _not_there(path) from None
    try:
        writer.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, TimeoutError):
        raise _not_there(path) from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return _decoded(line, path)


def call_sync(state_dir: Path, op: str, timeout: float = TIMEOUT,
              **fields: Any) -> dict[str, Any]:
    """Ask the running agent (blocking, for the CLI); ``AgentUnavailableError`` if none."""
    path = socket_path(state_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            with socket_address(path) as address:
                s.connect(address)
            s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_LINE * 16:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            raise _not_there(path) from None
    return _decoded(data, path)


def _decoded(line: bytes, path: Path) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise _not_there(path)
    return reply


def running(state_dir: Path) -> bool:
    """Whether an agent answers on this hospital's socket now."""
    try:
        call_sync(state_dir, "status", timeout=3.0)
    except AgentUnavailableError:
        return False
    return True


def refuse_if_running(state_dir: Path, what: str) -> None:
    """Raise ``AgentRunningError`` (one sentence) when an agent owns this hospital's state.

    Why refuse rather than go ahead: the agent trains and sends on the server's schedule;
    a second trainer would overwrite its model mid-round, a second sender would race its
    send record.
    """
    if running(state_dir):
        raise AgentRunningError(
            f"the hospital's agent is running and owns its model and rounds, so `{what}` was "
            "not run: see what the agent does with `agent-status`, approve or skip a round "
            "with `approve`/`skip` (or in the app), or stop it (`agent-stop`, or systemctl "
            "stop) to work by hand")

