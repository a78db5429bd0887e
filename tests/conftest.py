"""Shared pytest fixtures. Helpers add session-scoped fixtures here (tiny zoos, trained predictors)."""

from __future__ import annotations

import os

# Keep test runs deterministic and friendly to a 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
