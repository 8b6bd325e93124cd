"""Listening sockets the test session opens on an address other than loopback: the suite-wide check
of tests/conftest.py (everything the tests start must listen on 127.0.0.1 only).

Linux /proc only. A background thread reads /proc/net/tcp{,6} twice a second; a listener on a
non-loopback address that was not there before the session is traced to its process, and counts if
that process started after the session began (so a service of the machine is never blamed).
"""

from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

from avgk.runtime import procfs

_LISTEN = "0A"
PROBE_MARK = "avgk-listener-probe"
"""In the command line of a process allowed a non-loopback listener: the unit test of this check opens
one on purpose (a mark, not a pid list, so the watch of every pytest process, xdist's included, knows it)."""


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])  # one little-endian 32-bit word
    # four little-endian 32-bit words
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening() -> dict[int, str]:
    """Socket inode -> "address:port" of every TCP listener on the machine."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != _LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            out[int(fields[9])] = f"{_address(hex_address)}:{int(hex_port, 16)}"
    return out


def is_loopback(endpoint: str) -> bool:
    address = ipaddress.ip_address(endpoint.rsplit(":", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _owner(inode: int) -> int | None:
    target = f"socket:[{inode}]"
    for pid in procfs.pids():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
        except OSError:
            continue
    return None


class ListenerWatch:
    """Samples listeners until stopped; `found` maps "address:port" -> the command that opened it."""

    def __init__(self, *, session_start_ticks: int, interval_s: float = 0.5, exempt_probes: bool = True) -> None:
        self.session_start = session_start_ticks
        self.exempt_probes = exempt_probes
        self.interval_s = interval_s
        self.before = set(listening())
        self.seen: set[int] = set()
        self.found: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        for inode, endpoint in listening().items():
            if inode in self.before or inode in self.seen or is_loopback(endpoint):
                continue
            self.seen.add(inode)
            pid = _owner(inode)
            start = procfs.started(pid) if pid else None
            if start is None or start < self.session_start:
                continue
            command = procfs.cmdline(pid) or "?"
            if not (self.exempt_probes and PROBE_MARK in command):
                self.found[endpoint] = f"pid {pid}: {command[:200]}"

    def stop(self) -> dict[str, str]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.found
