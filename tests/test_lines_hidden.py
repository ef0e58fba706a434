"""``lines_hidden``: lines written straight to a descriptor are hidden when they match; the rest pass as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from defectsynth.platform.logs import RAY_LOG_LINE_START, RAYLET_LINE_START, lines_hidden

NOTICE = re.compile(rb"max_restarts > 0")
RAYLET_NOTICE = re.compile(rb"\(raylet\).* worker processes have been started")


def test_matching_lines_are_hidden_and_the_rest_pass_in_order(capfd: pytest.CaptureFixture[str]) -> None:
    with lines_hidden(2, NOTICE, RAY_LOG_LINE_START):
        os.write(2, b"before\n[2026-12-06 E 1 1] core_worker.cc: Actor ... max_restarts > 0. See ...\n")
        os.write(2, b"[2026-12-06 W 1 1] a C++ warning that stays\nafter\n")
    assert capfd.readouterr().err == "before\n[2026-12-06 W 1 1] a C++ warning that stays\nafter\n"


def test_a_progress_bar_redrawn_without_newlines_goes_out_at_once(capfd: pytest.CaptureFixture[str]) -> None:
    with lines_hidden(2, NOTICE, RAY_LOG_LINE_START):
        os.write(2, b"\rgenerate:  10%")
        os.write(2, b"\rgenerate:  20%")
        os.write(2, b"[2026-12-06 E 1 1] max_")  # a log line arriving in two writes is judged whole
        os.write(2, b"restarts > 0\n\rgenerate: 100%\n")
    assert capfd.readouterr().err == "\rgenerate:  10%\rgenerate:  20%\rgenerate: 100%\n"


def test_a_coloured_raylet_line_printed_in_two_writes_is_hidden_on_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    with lines_hidden(1, RAYLET_NOTICE, RAYLET_LINE_START):
        os.write(1, b"fit 1/4\n\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node")
        os.write(1, b"\n(raylet) another notice\nfit 2/4\n")
    assert capfd.readouterr().out == "fit 1/4\n(raylet) another notice\nfit 2/4\n"


def stdout_within(capfd: pytest.CaptureFixture[str], *, seconds: float) -> str:
    """What reached stdout within ``seconds``: the forwarder thread passes it on a moment after the write."""
    out, deadline = "", time.monotonic() + seconds
    while not out and time.monotonic() < deadline:
        out = capfd.readouterr().out
        time.sleep(0.01)
    return out


def test_other_stdout_goes_out_at_once_and_text_before_a_hidden_raylet_line_stays(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with lines_hidden(1, RAYLET_NOTICE, RAYLET_LINE_START):
        os.write(1, b"(Pdb) ")  # a prompt waiting for input is not held
        assert stdout_within(capfd, seconds=2) == "(Pdb) "
        os.write(1, b"fit 3/4 (raylet) 8 PYTHON worker processes have been started\n")
    assert capfd.readouterr().out == "fit 3/4 "


def test_the_descriptor_is_restored_after_the_block(capfd: pytest.CaptureFixture[str]) -> None:
    with lines_hidden(2, NOTICE, RAY_LOG_LINE_START):
        pass
    os.write(2, b"max_restarts > 0 outside the block\n")
    assert capfd.readouterr().err == "max_restarts > 0 outside the block\n"


def test_a_process_started_without_stdout_runs_the_block_unfiltered() -> None:
    script = (
        "import os, re\n"
        "from defectsynth.platform.logs import RAYLET_LINE_START, lines_hidden\n"
        "with lines_hidden(1, re.compile(rb'x'), RAYLET_LINE_START):\n"
        "    os.write(2, b'ran\\n')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
        preexec_fn=lambda: os.close(1),
    )
    assert run.returncode == 0 and run.stderr == b"ran\n", run.stderr
