"""Shared helpers for tests."""

from __future__ import annotations

from pathlib import Path

from stability.config import compose as make_config

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "make_config"]
