"""The suite-wide check that nothing the tests start listens beyond loopback (tests/helpers/listeners.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import listeners

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SERVE = ("import socket, sys, time\n"
         "s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen()\n"
         "print(s.getsockname()[1], flush=True); time.sleep(60)\n")


def _listen_on(host: str) -> tuple[subprocess.Popen, int]:
    # The mark: the session's own watch must not fail the suite for this one.
    proc = subprocess.Popen([sys.executable, "-c", SERVE, host, listeners.PROBE_MARK], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_a_wildcard_listener_of_a_new_process_is_found_and_a_loopback_one_is_not():
    # sampled by hand below; exempts nothing, unlike the session's own watch
    watch = listeners.ListenerWatch(session_start_ticks=0, interval_s=3600, exempt_probes=False)
    wildcard, wildcard_port = _listen_on("0.0.0.0")
    loopback, loopback_port = _listen_on("127.0.0.1")
    try:
        time.sleep(0.2)
        watch.sample()
        found = watch.stop()
    finally:
        for proc in (wildcard, loopback):
            proc.kill()
            proc.wait()
    assert f"0.0.0.0:{wildcard_port}" in found and str(wildcard.pid) in found[f"0.0.0.0:{wildcard_port}"], found
    assert not any(endpoint.endswith(f":{loopback_port}") for endpoint in found), found


@pytest.mark.parametrize("endpoint, loopback", [("127.0.0.1:80", True), ("::1:80", True),
                                                ("::ffff:127.0.0.1:80", True), ("0.0.0.0:80", False),
                                                (":::80", False), ("10.0.0.5:80", False)])
def test_loopback_endpoints(endpoint, loopback):
    assert listeners.is_loopback(endpoint) is loopback


def test_proc_addresses_decode():
    assert str(listeners._address("0100007F")) == "127.0.0.1"
    assert str(listeners._address("00000000000000000000000001000000")) == "::1"
