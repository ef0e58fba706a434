"""Servers that tests start in their own processes: a free port, a wait until they answer, a clean stop."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    """Return once ``url`` answers; fail the test (with the server's log) when it exits or stays silent."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to 127.0.0.1, never a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{server.args} exited with {server.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with opener.open(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{server.args} did not answer on {url} within {timeout} s:\n{log.read_text(errors='replace')}")


def stop(server: subprocess.Popen[bytes]) -> None:
    """Terminate a server this test started (SIGKILL after 10 s) and reap it."""
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def serving(
    args: Sequence[str], health_url: str, log: Path, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``args`` as a server (output to ``log``, a file, so it never fills a pipe) until the block ends."""
    with log.open("ab") as output:
        server = subprocess.Popen(list(args), env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_up(health_url, server, log, timeout)
        yield server
    finally:
        stop(server)
