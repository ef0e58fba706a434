"""``stderr_without``: lines written straight to descriptor 2 are hidden when they match; the rest pass as written."""

from __future__ import annotations

import os
import re

import pytest

from defectsynth.platform.logs import stderr_without

NOTICE = re.compile(rb"max_restarts > 0")


def test_matching_lines_are_hidden_and_the_rest_pass_in_order(capfd: pytest.CaptureFixture[str]) -> None:
    with stderr_without(NOTICE):
        os.write(2, b"before\n[2026-12-06 E 1 1] core_worker.cc: Actor ... max_restarts > 0. See ...\n")
        os.write(2, b"[2026-12-06 W 1 1] a C++ warning that stays\nafter\n")
    assert capfd.readouterr().err == "before\n[2026-12-06 W 1 1] a C++ warning that stays\nafter\n"


def test_a_progress_bar_redrawn_without_newlines_goes_out_at_once(capfd: pytest.CaptureFixture[str]) -> None:
    with stderr_without(NOTICE):
        os.write(2, b"\rgenerate:  10%")
        os.write(2, b"\rgenerate:  20%")
        os.write(2, b"[2026-12-06 E 1 1] max_")  # a log line arriving in two writes is judged whole
        os.write(2, b"restarts > 0\n\rgenerate: 100%\n")
    assert capfd.readouterr().err == "\rgenerate:  10%\rgenerate:  20%\rgenerate: 100%\n"


def test_the_descriptor_is_restored_after_the_block(capfd: pytest.CaptureFixture[str]) -> None:
    with stderr_without(NOTICE):
        pass
    os.write(2, b"max_restarts > 0 outside the block\n")
    assert capfd.readouterr().err == "max_restarts > 0 outside the block\n"
