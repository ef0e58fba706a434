"""Logging set-up for the command line: one handler on stderr, library modules only call getLogger."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from defectsynth.storage.redact import redact


class RedactingFormatter(logging.Formatter):
    """A formatter that masks credentials in URIs (``storage.redact``) in every line it writes, whoever logged it."""

    def format(self, record: logging.LogRecord) -> str:
        """The formatted line, redacted."""
        return redact(super().format(record))


def setup_logging(verbose: bool = False) -> None:
    """Send defectsynth's log records to stderr, INFO by default, DEBUG when ``verbose``; credentials masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # MLflow's table migrations and its artifact-copy bars say nothing a person acts on
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Ray's C++ log lines, or the start of one: "[2026-12-06 16:24:40,337 E 28238 28238] ..."
RAY_LOG_LINE_START = re.compile(rb"\[\d{4}-\d\d-\d\d |\[[\d-]{0,10}$")
# What Ray's driver prints for the raylet, "(raylet) ...", coloured or not, or the start of it.
RAYLET_LINE_START = re.compile(
    rb"""(?:\x1b\[[\d;]*m)?\(raylet\)                        # "(raylet)", after a colour code or not
    | (?:\x1b(?:\[[\d;]*m?)?)?(?:\((?:r(?:a(?:y(?:l(?:e(?:t)?)?)?)?)?)?)?$  # or, at the end, where one may begin
    """,
    re.VERBOSE,
)


@contextmanager
def lines_hidden(fd: int, drop: re.Pattern[bytes], held: re.Pattern[bytes]) -> Iterator[None]:
    """Within the block, hide the lines on file descriptor ``fd`` that ``drop`` matches, whoever writes them.

    At the descriptor, not in ``sys.stdout``: Ray's C++ core worker writes to it directly. Only a partial line from
    where ``held`` matches is held until its newline (it may become a hidden line); other output passes as it comes,
    progress bars included.
    """
    _flush_std_streams()
    try:
        shown = os.dup(fd)
    except OSError:  # no such descriptor (a process started without it): nothing to filter
        shown = None
    if shown is None:
        yield
        return
    read_end = None
    try:
        read_end = _pipe_at(fd)
        forwarder = threading.Thread(target=_forward_lines, args=(read_end, shown, drop, held), daemon=True)
        forwarder.start()
    except BaseException:  # no pipe or no thread: the descriptor goes back as it was, nothing left open
        os.dup2(shown, fd)
        os.close(shown)
        if read_end is not None:
            os.close(read_end)
        raise
    try:
        yield
    finally:
        _flush_std_streams()
        os.dup2(shown, fd)  # the pipe's last write end closes, so the forwarder drains it and stops
        forwarder.join(timeout=5)
        if not forwarder.is_alive():  # else a child started in the block still writes through it: leave both open
            os.close(shown)
            os.close(read_end)


def _pipe_at(fd: int) -> int:
    """Point ``fd`` at the write end of a new pipe; return its read end."""
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    return read_end


def _flush_std_streams() -> None:
    """Flush Python's stdout and stderr where the process has them (started without one, it is None)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with suppress(OSError, ValueError):
                stream.flush()


def _forward_lines(read_end: int, shown: int, drop: re.Pattern[bytes], held: re.Pattern[bytes]) -> None:
    """Copy the pipe to ``shown`` line by line, leaving out the lines ``drop`` matches.

    It drains the pipe to the end even when ``shown`` fails (a closed terminal): a full pipe would block every writer.
    """
    pending = b""
    while chunk := os.read(read_end, 65536):
        try:
            pending = _write_shown(pending + chunk, shown, drop, held)
        except OSError:
            pending = b""
    with suppress(OSError):
        _write_all(shown, _shown_part(pending, drop, held).removesuffix(b"\n"))


def _write_shown(text: bytes, shown: int, drop: re.Pattern[bytes], held: re.Pattern[bytes]) -> bytes:
    """Write what of ``text`` is shown; return the unfinished line still held until its newline.

    Only the part of the last line from where ``held`` matches is held: anything else, such as a progress bar
    redrawn with carriage returns, goes out at once.
    """
    *lines, rest = text.split(b"\n")
    start = held.search(rest)
    cut = start.start() if start else len(rest)
    _write_all(shown, b"".join(_shown_part(line, drop, held) for line in lines) + rest[:cut])
    return rest[cut:]


def _shown_part(line: bytes, drop: re.Pattern[bytes], held: re.Pattern[bytes]) -> bytes:
    """The line and its newline; of a hidden line, only what was on it before the held part began (a bar's text)."""
    if not drop.search(line):
        return line + b"\n"
    start = held.search(line)
    return line[: start.start()] if start else b""


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is out (a pipe or terminal may take a large write in parts)."""
    while data:
        data = data[os.write(fd, data) :]
