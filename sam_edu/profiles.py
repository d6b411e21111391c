"""Run profiles for the book: ``SAM_EDU_PROFILE=quick`` (the default) or ``full``.

``quick`` keeps every chapter to about a minute on two CPU cores: fewer steps, fewer seeds,
smaller models. ``full`` is what a reader with a GPU runs. Chapters print which profile they ran.
"""

from __future__ import annotations

import os
from typing import TypeVar

PROFILES = ("quick", "full")
T = TypeVar("T")


def profile() -> str:
    """The active profile, read from the ``SAM_EDU_PROFILE`` environment variable."""
    name = os.environ.get("SAM_EDU_PROFILE", "quick").strip().lower() or "quick"
    if name not in PROFILES:
        raise ValueError(
            f"SAM_EDU_PROFILE must be one of {PROFILES}, got {os.environ['SAM_EDU_PROFILE']!r}"
        )
    return name


def pick(quick: T, full: T) -> T:
    """``quick`` under the quick profile, ``full`` under the full one."""
    return quick if profile() == "quick" else full
