"""The admin views behind the admin dashboard (``admin_query``), over real TLS."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from securefl.client.session import AdminSession, HospitalSession
from securefl.errors import LocalProtocolError, SecureFLError
from securefl.protocol import messages as wm
from securefl.server import audit
from tests.integration.conftest import Federation, forged_admin, running


def test_hospitals_history_and_audit_tail(fed: Federation) -> None:
    settings = fed.server_settings()

    async def scenario() -> None:
        async with running(settings) as srv, HospitalSession(
                fed.client_settings("a", srv.port)) as h:
            await h.get_global()
            async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                rows = {r.name: r for r in await admin.hospitals()}
                assert set(rows) == {"a", "b", "c"}
                assert rows["a"].online and rows["a"].last_seen
                assert rows["a"].cert_expires[:2] == "20"
                assert not rows["b"].online and rows["b"].last_seen == ""
                versions = await admin.history()
                assert [v.version for v in versions] == [0]
                assert len(versions[0].sha256) == 64
                entries = await admin.audit(limit=3)
                assert len(entries) == 3
                assert entries[-1].event == "connected" and entries[-1].name == "admin"
                assert all("prev=" not in e.detail for e in entries)
            # A hospital may not ask: its own session does not send the request, and the
            # server refuses a hospital certificate that asks through the admin's client.
            with pytest.raises(LocalProtocolError, match="'admin_query' needs the admin"):
                await h.conn.request(wm.AdminQuery(what="audit"))
            async with forged_admin(fed.client_settings("a", srv.port)) as fake:
                with pytest.raises(SecureFLError) as err:
                    await fake.audit()
                assert err.value.code == "forbidden"

    asyncio.run(scenario())


def test_audit_tail_reads_only_the_end(tmp_path) -> None:
    log = audit.AuditLog(tmp_path / "audit.jsonl")
    for i in range(500):
        log.record("submission", name=f"h{i}", collected=i)
    log.close()
    tail = audit.tail(tmp_path / "audit.jsonl", 5, chunk=256)
    assert [e["name"] for e in tail] == [f"h{i}" for i in range(495, 500)]
    assert audit.tail(tmp_path / "missing.jsonl", 5) == []


def test_a_damaged_audit_log_keeps_the_next_entries_and_still_reads(
        fed: Federation, caplog: pytest.LogCaptureFixture) -> None:
    """Walking it: with the audit log's last line cut off, the server glued its
    ``server-start`` entry onto it (lost with it), and ``admin audit`` answered "internal
    server error" for good, as it did for a garbage line in the middle.  Now the next entry
    starts its own line, the console says the log was damaged, and the admin reads every
    entry with the damaged lines marked as such."""
    settings = fed.server_settings()
    path = settings.audit_log
    log = audit.AuditLog(path)
    log.record("submission", name="a", collected=1)
    log.close()
    with path.open("ab") as f:
        f.write(b"\x00\x17 overwritten\n")  # garbage in the middle
        f.write(b'{"seq":2,"time":"2026-12-01T0')  # and a cut-off last line

    async def scenario() -> list[wm.AuditRow]:
        async with running(settings) as srv, AdminSession(
                fed.client_settings("admin", srv.port)) as admin:
            return await admin.audit(limit=10)

    with caplog.at_level("WARNING"):
        rows = asyncio.run(scenario())
    assert any("ended in a cut-off line" in r.getMessage() for r in caplog.records)
    events = [r.event for r in rows]
    assert events[:5] == ["submission", "damaged-line", "damaged-line", "audit-damaged",
                          "server-start"], events
    assert "not an entry" in rows[1].detail
    # Walking it, a damaged line showed as "0", the number of the log's first entry.
    assert [r.seq for r in rows[:3]] == [0, -1, -1]
    from securefl.client.admin_text import audit_lines

    table = audit_lines(rows[:3])
    assert [line.split()[0] for line in table[1:]] == ["0", "-", "-"], table
    lines = path.read_bytes().splitlines()
    assert lines[2] == b'{"seq":2,"time":"2026-12-01T0'  # kept as it was, on its own
    assert b'"audit-damaged"' in lines[3] and b'"server-start"' in lines[4]
    with pytest.raises(SecureFLError, match=r"damaged at 2 places \(line 2: not an entry "
                       r"\(cut off or overwritten\); line 3: not an entry"):
        audit.verify(path)  # the damage stays visible to whoever checks the chain


def test_store_info_reads_metadata_without_weights(tmp_path) -> None:
    from securefl.server.store import ModelStore

    store = ModelStore(tmp_path)
    written = store.write(np.ones(10, np.float32), contributors=2, total_samples=7)
    info = store.info(0)
    assert info == written and info.total_samples == 7


def test_aggregate_reports_each_unmask_answer(fed: Federation) -> None:
    """The admin sees the unmask step advance (pushes while its request is open), ending
    with every asked hospital answered; a second aggregate starts from fresh progress."""
    settings = fed.server_settings()

    async def one_round(port: int, version: int) -> list:
        async def hospital(name: str) -> None:
            async with HospitalSession(fed.client_settings(name, port)) as h:
                await h.get_global()
                await h.send(np.full(1000, 0.01, np.float32), 4)

        tasks = [asyncio.create_task(hospital(n)) for n in ("a", "b", "c")]
        seen: list = []
        async with AdminSession(fed.client_settings("admin", port)) as admin:
            while await admin.count() < 3:
                await asyncio.sleep(0.02)
            out = await admin.aggregate(on_progress=seen.append)
        await asyncio.gather(*tasks)
        assert out.version == version
        return seen

    async def scenario() -> None:
        async with running(settings) as srv:
            for version in (1, 2):
                seen = await one_round(srv.port, version)
                assert seen[0].answered == 0 and seen[-1].answered == 3
                assert all(p.asked == 3 and p.needed == 3 for p in seen)  # c = 1: t = 3
                assert [p.answered for p in seen] == sorted(p.answered for p in seen)
                assert {p.round_id for p in seen} == {version}

    asyncio.run(scenario())
