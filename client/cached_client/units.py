"""Byte sizes as people write them: 8GiB, 512MB, 1e9, or 50% (of a total the caller supplies)."""

from __future__ import annotations

import re

__all__ = ["parse_size", "format_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(value: str | int | float, total: int | None = None, what: str = "size") -> int:
    """Bytes from an int or a string; "N%" needs `total`. ValueError names the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a byte size, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        text = value.strip()
        if text.endswith("%"):
            if total is None:
                raise ValueError(f"{what} {value!r} is a percentage, but there is nothing to take it of")
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ValueError(f"{what} must be a size like 8GiB or 50%, got {value!r}") from None
            n = int(total * pct / 100)
        else:
            m = _SIZE.match(text)
            if not m or m.group(2).lower() not in _UNITS:
                raise ValueError(f"{what} must be a size like 8GiB, 512MB or 50%, got {value!r}")
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
