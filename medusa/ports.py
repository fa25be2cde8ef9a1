"""A free TCP port on the loopback interface, for the local processes the project starts itself
(tensor-parallel rank groups, a private redis-server, a local Serve cluster). Standard library only."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
