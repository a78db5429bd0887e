"""`pipeline.allocator.tune_allocator`: applied once per process on glibc, and never over the user's own choice.
Each case runs in a fresh interpreter: malloc settings are process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

_PROBE = "from pipeline.allocator import allocator_report as r, tune_allocator as t; print(t(), t(), r())"


def _run(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "UNFZOO_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_tunes_glibc_once_per_process() -> None:
    assert _run() == "True True allocator: tuned (pipeline/allocator.py)"


@pytest.mark.parametrize("env", [{"UNFZOO_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"MALLOC_MMAP_THRESHOLD_": "65536"}])
def test_the_users_own_malloc_settings_win(env: dict[str, str]) -> None:
    assert _run(**env) == "False False allocator: glibc defaults"
