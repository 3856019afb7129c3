"""JSON that strict parsers read: every non-finite float (NaN, inf) written as null, and where each one was."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_json(obj: Any, where: str = "", found: list[str] | None = None) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None, which strict JSON can hold; the dotted path and
    value of each go to ``found``."""
    if isinstance(obj, dict):
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    if not isinstance(obj, (str, int, type(None))) and hasattr(obj, "__float__"):  # float, numpy or 0-d tensor
        obj = float(obj)
        if not math.isfinite(obj):
            if found is not None:
                found.append(f"{where} = {obj}")
            return None
    return obj


def non_finite_notice(found: list[str]) -> str:
    """One line naming the values :func:`finite_json` wrote as null (the first ten)."""
    shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
    return f"{len(found)} non-finite values are written as null (JSON has no NaN or infinity): {shown}"


def dumps_strict(obj: dict[str, Any], indent: int = 2, notes_key: str = "notices") -> str:
    """``obj`` as strict JSON text (``allow_nan=False``) ending in a newline; when values were non-finite, a line
    naming them is appended to the list ``obj[notes_key]`` of the written copy."""
    found: list[str] = []
    strict = finite_json(obj, found=found)
    if found:
        strict[notes_key] = [*strict.get(notes_key, []), non_finite_notice(found)]
    return json.dumps(strict, indent=indent, default=float, allow_nan=False) + "\n"


def loads_strict(text: str) -> Any:
    """Parse JSON as strict parsers do: a ``NaN`` / ``Infinity`` constant is a ValueError (Python's json accepts it)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)
