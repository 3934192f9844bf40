"""One train, get or send at a time per hospital, whichever program runs it.

Walking it: two ``client send`` of one hospital at once both joined the round (the server
counted the hospital twice, and one send waited after the round had published until it was
interrupted); two ``train`` runs, or ``train`` beside ``get``, overwrite each other's model.
Another process holding the hospital's work lock stands in here for the other command.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from securefl import config
from securefl.cli import main
from securefl.client.hospital import Hospital
from securefl.errors import HospitalBusyError

from .conftest import Federation, running

HOLD = ("import sys, time\n"
        "from pathlib import Path\n"
        "from securefl.fsutil import hold_lock\n"
        "f = hold_lock(Path(sys.argv[1]))\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n")


def _other_process_holds(state_dir: Path) -> subprocess.Popen:
    state_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir / ".work.lock")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_train_get_and_send_are_refused_while_another_process_works_on_the_hospital(
        fed: Federation, capsys: pytest.CaptureFixture[str]) -> None:
    settings = fed.server_settings()
    kit = fed.certs.kit("a") / "hospital.toml"
    site = Hospital(fed.client_settings("a", 0, ml=None), None)
    other = _other_process_holds(site.state_dir)
    try:
        async def scenario() -> None:
            async with running(settings) as srv:
                here = Hospital(fed.client_settings("a", srv.port, ml=None), None)
                async with here.session() as s:
                    with pytest.raises(HospitalBusyError, match="`get` was not run"):
                        await here.get(s)
                    with pytest.raises(HospitalBusyError, match="`send` was not run"):
                        await here.send_update(s, np.full(1000, 0.01, np.float32), 10, 0)
                # Nothing was downloaded and nothing recorded as sent.
                assert not (here.state_dir / "global.npy").exists()
                assert here.outbox.record() is None
                # The CLI says so before it says anything else (it printed "sending ..."
                # first, walking it).
                data = config.read_toml(kit)
                data.update(host="127.0.0.1", port=srv.port)
                data.pop("ml", None)
                cli_kit = config.write_toml(kit.with_name("cli.toml"), data)
                np.save(fed.tmp / "u.npy", np.full(1000, 0.01, np.float32))
                shown = await asyncio.to_thread(subprocess.run, [
                    sys.executable, "-m", "securefl", "client", "--config", str(cli_kit),
                    "send", "--update", str(fed.tmp / "u.npy"), "--samples", "5"],
                    capture_output=True, text=True, timeout=120)
                assert shown.returncode == 16, shown.stderr
                assert shown.stdout == "" and "`send` was not run" in shown.stderr

        asyncio.run(scenario())
        with pytest.raises(HospitalBusyError, match="`train` was not run"):
            site.train()
        assert main(["client", "--config", str(kit), "train"]) == 16
        err = capsys.readouterr().err
        assert "another train, get or send of this hospital is running" in err
        assert "wait for it to finish, then run `train` again" in err
        assert len(err.strip().splitlines()) == 1, err
    finally:
        other.communicate("")
    # Once the other one is done, the same work goes ahead.
    async def after() -> None:
        async with running(settings) as srv:
            here = Hospital(fed.client_settings("a", srv.port, ml=None), None)
            async with here.session() as s:
                assert (await here.get(s)).version == 0

    asyncio.run(after())
