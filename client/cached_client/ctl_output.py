"""How cachectl prints: `--json` reports as one JSON document, the rest as aligned text."""

from __future__ import annotations

import json
import sys
from typing import Any

from .units import format_bytes

__all__ = ["print_json", "size", "percent"]


def print_json(report: Any) -> None:
    json.dump(report, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    sys.stdout.flush()


def size(n: int | None) -> str:
    """Bytes for people; "not readable" where they could not be read."""
    return "not readable" if n is None else format_bytes(n)


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"
