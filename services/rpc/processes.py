"""Local child processes: free ports, and children that die with their parent."""

from __future__ import annotations

import ctypes
import random
import signal
import socket
from pathlib import Path

_pick = random.SystemRandom()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server this process starts a little later.

    Picked at random below the kernel's ephemeral range: a kernel-assigned port is ephemeral, and any outgoing
    connection may take it before the server binds it (seen in CI: a pool of `expertmesh up` failed to bind).
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = _pick.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # a crowded range: fall back to the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def die_with_parent() -> None:
    """preexec_fn for Popen: the child gets SIGTERM if its parent dies outright (Linux PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass
