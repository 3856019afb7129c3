"""Classes named by their class path (``package.module.Class``) in a config, a checkpoint or a command line."""

from __future__ import annotations

import importlib
from typing import Any


def import_class_path(path: str) -> Any:
    """The object ``path`` (``package.module.Class``) names; an ImportError saying why it cannot be had (no module
    part, a module that does not import, or that lacks the name)."""
    module, _, name = str(path).rpartition(".")
    if not module:
        raise ImportError("no module part: a class path looks like package.module.Class")
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError as e:
        raise ImportError(str(e)) from None


def subclass_at(path: str, base: type, label: str) -> type:
    """The subclass of ``base`` that ``path`` names, or a ValueError that starts with ``label`` (what names it, e.g.
    ``model.mask_sampler='x.Y'``) and says what to give instead."""
    try:
        cls = import_class_path(path)
    except ImportError as e:
        raise ValueError(f"{label} does not import ({e}); give the class path (package.module.Class) of a "
                         f"{base.__name__} subclass, with its package on PYTHONPATH") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{label} is {cls!r}, not a {base.__name__} subclass; give the class path of a subclass of "
                         f"{base.__module__}.{base.__name__}")
    return cls
