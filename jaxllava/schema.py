"""Building blocks of the config sections (`data/config.py`, `model/config.py`, `train/config.py`,
`eval/config.py`): value checks for `__post_init__`, and the marker of fields that hold paths.

Every section checks its values when it is built, so a bad value fails when the config is read,
not steps into a run; the loader (`jaxllava/config.py`) adds where the value was set.
"""
from __future__ import annotations

import dataclasses
import math

from jaxllava.errors import FieldError


def path_field(default=dataclasses.MISSING, **kwargs):
    """A field holding a path (or, for a mapping, paths as values). The loader makes it absolute:
    relative to the folder of the config file that set it, or to the working directory when it
    came from `--set` or from code."""
    return dataclasses.field(default=default, metadata={"path": True}, **kwargs)


def require(ok: bool, key: str, detail: str) -> None:
    if not ok:
        raise FieldError(key, detail)


def at_least(section, minimum: int, *names: str, null_ok: bool = False) -> None:
    """Each named field is >= minimum (or None when null_ok)."""
    for name in names:
        value = getattr(section, name)
        if value is None and null_ok:
            continue
        require(value >= minimum, name, f"must be >= {minimum}{' or null' if null_ok else ''}, got {value!r}")


def positive(section, *names: str) -> None:
    """Each named field is a finite number > 0 (NaN fails every comparison, so it is refused too)."""
    for name in names:
        value = getattr(section, name)
        require(math.isfinite(value) and value > 0, name, f"must be a finite number > 0, got {value!r}")
