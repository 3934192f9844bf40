"""The hospital's own log over real TLS: a refusal is on record at the hospital, whatever
the server keeps; a whole secure-aggregation round leaves no key, share or weight in it."""

from __future__ import annotations

import asyncio
import base64
import json
import re

import numpy as np
import pytest

from securefl import config
from securefl.cli import main
from securefl.client import session as session_module
from securefl.client.hospital import Hospital
from securefl.client.hospital_log import LOG_NAME
from securefl.client.session import AdminSession
from securefl.crypto.secagg import ClientRound
from securefl.errors import CryptoError

from .conftest import Federation, running

D = 1000


def _entries(site: Hospital) -> list[dict]:
    return [json.loads(line) for line in (site.state_dir / LOG_NAME).read_text().splitlines()]


def test_a_refused_roster_is_in_the_hospitals_own_log_without_the_server(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    """Attack 3 (a server asking for the update in the clear): the hospital refuses, and its
    own log says so with the reason and code.  The log is read after the server is gone and
    its audit log deleted: nothing of the record depends on the server."""
    settings = fed.server_settings(round=config.RoundSettings(masking="plain"))

    async def scenario() -> int:
        async with running(settings) as srv:
            strict = Hospital(fed.client_settings("a", srv.port, ml=None,
                                                  policy=config.HospitalPolicy()), None)
            async with strict.session() as s:
                await strict.get(s)
                with pytest.raises(CryptoError, match="without masks"):
                    await strict.send_update(s, np.full(D, 0.01, np.float32), 5, 0)
                status = await s.status()  # the round it refused, as the server numbers it
                assert status.submitted == ()
                return status.round_id

    round_id = asyncio.run(scenario())
    assert round_id
    settings.audit_log.unlink()  # the server's record is gone; the hospital's is not

    kit_toml = fed.certs.kit("a") / "hospital.toml"
    assert main(["client", "--config", str(kit_toml), "log"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert "downloaded global version 0" in shown[0]
    assert f"joined round {round_id}" in shown[-2]
    assert f"REFUSED         round {round_id}, base v0" in shown[-1]
    assert "[crypto, by this hospital] the server asked" in shown[-1]
    assert "without masks" in shown[-1] and "nothing was sent" in shown[-1]

    site = Hospital(config.load(kit_toml, config.ClientSettings), None)
    events = [(e["event"], e["round"], e["base_version"]) for e in _entries(site)]
    assert events == [("downloaded", None, None), ("sending", None, 0),
                      ("joined", round_id, 0), ("refused", round_id, 0)]
    last = _entries(site)[-1]
    assert (last["code"], last["by"], last["action"]) == ("crypto", "hospital", "send")


BLOB = re.compile(r"[A-Za-z0-9+/]{65,}=*|[0-9a-fA-F]{65,}")


def test_a_whole_round_leaves_no_key_share_or_weight_in_the_log(
        fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three hospitals, full secure aggregation over TLS.  The real round objects are kept
    (a subclass that only records itself) so the test knows every secret of the round: the
    log holds none of them in any encoding, no long blob and no weight."""
    rounds: list[ClientRound] = []

    class Recorded(ClientRound):
        def __init__(self, **kwargs: object) -> None:
            super().__init__(**kwargs)  # type: ignore[arg-type]
            rounds.append(self)

    monkeypatch.setattr(session_module, "ClientRound", Recorded)
    ups = {n: np.random.default_rng(i).normal(0, 0.05, D).astype(np.float32)
           for i, n in enumerate("abc")}

    async def scenario() -> dict[str, Hospital]:
        async with running(fed.server_settings()) as srv:
            sites = {n: Hospital(fed.client_settings(n, srv.port, ml=None,
                                                     policy=config.HospitalPolicy()), None)
                     for n in "abc"}
            sessions = {n: await sites[n].session().connect() for n in "abc"}
            try:
                for n in "abc":
                    await sites[n].get(sessions[n])
                tasks = [asyncio.create_task(sites[n].send_update(sessions[n], ups[n], 10, 0))
                         for n in "abc"]
                async with AdminSession(fed.client_settings("admin", srv.port)) as admin:
                    while await admin.count() < 3:
                        await asyncio.sleep(0.02)
                    assert (await admin.aggregate()).version == 1
                outcomes = await asyncio.gather(*tasks)
                assert {o.version for o in outcomes} == {1}
            finally:
                for s in sessions.values():
                    await s.close()
        return sites

    sites = asyncio.run(scenario())
    assert len(rounds) == 3
    secrets: list[bytes] = []
    numbers: list[int] = []
    for r in rounds:
        secrets += [r._c.private_bytes(), r._s.private_bytes(), r._b, r._c.public, r._s.public,
                    *r._envelope_keys.values()]
        numbers += [share for pair in r._held.values() for share in pair]
    assert len(secrets) == 3 * 7 and len(numbers) == 3 * 6
    for site in sites.values():
        text = (site.state_dir / LOG_NAME).read_text()
        events = [e["event"] for e in _entries(site)]
        assert events == ["downloaded", "sending", "joined", "masked-input", "signed",
                          "published"]
        assert not BLOB.search(text), BLOB.search(text)
        for secret in secrets:
            for form in (secret.hex(), secret.hex()[:16], base64.b64encode(secret).decode(),
                         base64.urlsafe_b64encode(secret).decode().rstrip("="),
                         secret.decode("latin-1")):
                assert form not in text
        for n in numbers:
            assert str(n) not in text and format(n, "x") not in text
        for entry in _entries(site):  # no weight written as a number (times have ms)
            assert all(isinstance(v, int | str | None) for v in entry.values())
            assert not re.search(r"\d\.\d{3,}|\de-\d", json.dumps(entry | {"time": ""}))
