"""A private redis-server child process (for `medusa serve` without --redis-url, and tests):
binds 127.0.0.1 on a free port, keeps nothing on disk unless given a directory (then an
append-only file there survives a restart on the same port), requires a password when given
one, dies with stop().

Knows the redis-server command line; nothing of what is stored."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from medusa.errors import MedusaError
from medusa.ports import free_port


@dataclass
class LocalRedis:
    proc: subprocess.Popen
    port: int
    password: str | None = None
    dir: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        """SIGKILL (a crash), for fault tests."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> "LocalRedis":
        """A new redis-server on the same port, password and directory."""
        self.stop()
        return start_redis(self.port, password=self.password, dir=self.dir)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent() -> None:  # runs in the child before exec (Linux): no orphaned redis-server
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_redis(port: int | None = None, timeout_s: float = 10.0, *, password: str | None = None,
                dir: str | None = None) -> LocalRedis:
    exe = shutil.which("redis-server")
    if exe is None:
        raise MedusaError("redis-server is not installed: install it or pass --redis-url / REDIS_URL")
    port = port or free_port()
    persist = ["--dir", dir, "--appendonly", "yes", "--appendfsync", "always"] if dir else ["--appendonly", "no"]
    # The password goes in through stdin-free config: a "requirepass" line on the command line would
    # show in /proc/<pid>/cmdline, so it is passed as an include file readable by this user only.
    auth = []
    if password:
        import os
        import tempfile

        fd, conf = tempfile.mkstemp(prefix="medusa-redis-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {password}\n")
        auth = [conf]
    proc = subprocess.Popen([exe, *auth, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persist,
                             "--protected-mode", "yes", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MedusaError(f"redis-server exited: {proc.stderr.read().decode(errors='replace').strip()[:300]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                if reply.startswith(b"+PONG") or (password and reply.startswith(b"-NOAUTH")):
                    if auth:
                        import os

                        os.unlink(auth[0])  # read at start; not needed on disk any longer
                    return LocalRedis(proc, port, password, dir)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise MedusaError(f"redis-server did not start on port {port} within {timeout_s}s")
