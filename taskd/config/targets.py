"""Python handler targets: the one resolver of "package.module:function" names."""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

_PYTHON_TARGET = re.compile(
    r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII
)


class TargetError(ValueError):
    """A python target that names no callable; str() says why, as the config reports it."""


class NoCallable(TargetError, AttributeError):
    """The module has no callable of that name (an AttributeError too, as getattr raises)."""


class NoModule(TargetError, ImportError):
    """The target's module (`own`: it, or its package), or a module it imports, is not
    on the import path."""

    def __init__(self, message: str, *, own: bool = False) -> None:
        super().__init__(message)
        self.own = own


def add_import_dirs(dirs: Iterable[Path]) -> None:
    """Put `dirs` in front of Python's import path, in order, as PYTHONPATH would; a
    directory already on it stays where it is, so loading a config twice changes nothing."""
    new = [str(d) for d in dict.fromkeys(dirs) if str(d) not in sys.path]
    sys.path[:0] = new
    # A finder caches what a directory held: a module written since would go unseen.
    importlib.invalidate_caches()


def resolve(target: str) -> Callable[..., Any]:
    """The callable named by "package.module:function" (the part after ':' may be dotted,
    "module:Class.method" naming a method); imports the module."""
    if not _PYTHON_TARGET.fullmatch(target):
        raise TargetError(f"must look like 'package.module:function', got {target!r}")
    module_name, _, qualname = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        own = e.name is not None and f"{module_name}.".startswith(f"{e.name}.")
        raise NoModule(f"cannot import module {module_name!r}: {e}", own=own) from e
    except ImportError as e:
        raise TargetError(f"cannot import module {module_name!r}: {e}") from e
    except Exception as e:
        # Whatever the module raises as it runs: it cannot serve a job either.
        raise TargetError(f"cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    found: Any = module
    for attr in qualname.split("."):
        found = getattr(found, attr, None)
    if not callable(found):
        raise NoCallable(f"module {module_name!r} has no callable {qualname!r}")
    func: Callable[..., Any] = found
    return func
