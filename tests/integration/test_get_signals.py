"""A stop signal during ``get`` lets the download finish before the command ends.

Found walking it: SIGTERM (a service stop) or SIGHUP (a closed terminal) ended ``get``
without a word after ``global.json`` named the new version and before the hospital's state
followed it; the next ``train`` then went on from the old model and ``send`` labelled the
update with the new version.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from securefl import config
from securefl.client.hospital_log import HospitalLog

from .conftest import Federation, running

#: ``client get`` that sends itself ``sys.argv[2]`` as the download starts: a test cannot
#: time a signal into a one-second download from outside, so the command's step does it.
SIGNAL_SELF = """
import os, signal, sys
from securefl.client import session
real = session.HospitalSession.get_global
async def get_and_stop(self, *a, **k):
    os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    return await real(self, *a, **k)
session.HospitalSession.get_global = get_and_stop
from securefl.cli import main
sys.exit(main(["client", "--config", sys.argv[1], "get"]))
"""


@pytest.mark.parametrize(("stop", "cause"), [("SIGTERM", "a termination signal"),
                                             ("SIGHUP", "a hang-up (the terminal closed)")])
def test_a_stop_signal_during_get_lets_it_finish_and_says_so(
        fed: Federation, stop: str, cause: str) -> None:
    kit = fed.certs.kit("a") / "hospital.toml"

    async def scenario() -> None:
        async with running(fed.server_settings()) as srv:
            data = config.read_toml(kit)
            data.update(host="127.0.0.1", port=srv.port)
            data.pop("ml", None)
            here = config.write_toml(kit.with_name("here.toml"), data)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", SIGNAL_SELF, str(here), stop,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()
            said = err.decode().strip().splitlines()
            assert said[-1] == (f"securefl: stopped after {cause}, once get had finished: "
                                "what it printed above is complete")
            assert out.decode().startswith("global version 0 downloaded")

    asyncio.run(scenario())
    state = kit.parent / config.load(kit, config.ClientSettings).state_dir
    assert json.loads((state / "global.json").read_text())["version"] == 0
    entries, _ = HospitalLog(state).entries(5)
    assert entries[-1].event == "downloaded"


def test_get_run_in_process_leaves_the_callers_signal_handlers_as_they_were(
        fed: Federation) -> None:
    """``main()`` also runs inside other programs (scripts, these tests): the handlers
    ``get`` takes for its own run are given back, whatever the run's outcome."""
    import signal

    from securefl.cli import main

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    kit = fed.certs.kit("a") / "hospital.toml"  # nobody listens at its port: exit 10
    assert main(["client", "--config", str(kit), "get"]) == 10
    assert {s: signal.getsignal(s) for s in before} == before
