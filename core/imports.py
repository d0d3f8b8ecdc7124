"""Objects named by import path, ``"package.module:attribute"``: how configs name user code.

A registry filled at run time exists only in the process that filled it; a Ray actor or a Ray Train
worker imports our modules afresh and never sees it. An import path resolves the same everywhere,
so a user's reward or metric works inside workers, and a wrong one fails when the config is checked.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["is_import_path", "import_object"]


def is_import_path(name: str) -> bool:
    """``"a.b:c"`` names an object by import path (a bare name is a registry key)."""
    module, sep, attribute = name.partition(":")
    return bool(sep and module and attribute)


def import_object(path: str) -> Any:
    """The object at ``"package.module:attribute"`` (dotted attributes allowed); a clear error naming the part missing."""
    if not is_import_path(path):
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:attribute'")
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{path!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"{path!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj
