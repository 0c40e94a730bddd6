"""Numbers in the Markdown tables the training jobs write (grid, arena, audit)."""

from __future__ import annotations

import math

__all__ = ["fmt_number"]


def fmt_number(x: float | None, digits: int = 3, missing: str = "n/a") -> str:
    """``x`` with ``digits`` decimals; ``missing`` for None or NaN; never ``-0.000``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    text = f"{float(x):.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text
