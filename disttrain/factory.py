"""Users' own code by import path: ``"package.module:function"`` -> the function, and calling it.

``model.name`` and ``data.name`` take such a path besides the built-in names. Paths resolve like
``python -m``: the current directory comes first on the import path, so a module in the working directory
imports without installing it (the ``disttrain`` console script does not put the current directory on the path
itself). Last on the path (after installed packages) comes the directory of every config file read in this process
(:func:`add_import_dir`, called by config/parse.py load_config), so a module beside the config imports wherever the
command runs. Those directories
travel in the environment (``DISTTRAIN_IMPORT_DIRS``): ``--nproc`` and verify's workers are spawned with this
process's environment and resolve the same; under torchrun every worker reads the config itself.

Every failure is a :class:`ConfigError` in one line naming the key, the path and what went wrong: the
module does not import, has no such attribute, the attribute is not callable, or calling it raised.
What a factory must return is checked where it is used (data/, models/), and the whole config is tried once
before workers start by its caller (build.preflight). This module imports nothing of the project but its errors.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from .errors import ConfigError, one_line

IMPORT_DIRS = "DISTTRAIN_IMPORT_DIRS"  # the environment variable: config directories, os.pathsep-separated
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_import_path(name: str) -> bool:
    return ":" in name


def check_name(key: str, name: str, builtins: tuple[str, ...]) -> None:
    """``name`` is a built-in name or a well-formed ``package.module:function`` (nothing is imported)."""
    if name in builtins or IMPORT_PATH.match(name):
        return
    raise ConfigError(f"{key}: {name!r} is neither one of {', '.join(builtins)} nor an import path "
                      "'package.module:function'")


def add_import_dir(directory: str | os.PathLike) -> None:
    """Make ``directory`` (a config file's) importable for import paths here and in every process started from
    here with this environment."""
    path = os.path.abspath(directory)
    dirs = import_dirs()
    if path not in dirs:
        os.environ[IMPORT_DIRS] = os.pathsep.join([*dirs, path])


def import_dirs() -> list[str]:
    """The config directories import paths resolve in, after the current directory."""
    return [d for d in os.environ.get(IMPORT_DIRS, "").split(os.pathsep) if d]


def _importable() -> None:
    # What `python -m` does: the current directory is importable, ahead of installed packages. The configs'
    # directories come last, so a file beside a config never shadows the standard library or an installed package.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    for directory in import_dirs():
        if directory not in sys.path:
            sys.path.append(directory)


def resolve(key: str, path: str) -> Callable[..., Any]:
    """Import ``package.module`` of ``path`` and return its callable ``function`` (dotted attributes allowed)."""
    if not IMPORT_PATH.match(path):
        raise ConfigError(f"{key}: {path!r} is not an import path 'package.module:function'")
    module_name, attr = path.split(":", 1)
    _importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises while it is imported
        raise ConfigError(f"{key}: cannot import {module_name!r} (from {path!r}): {one_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}: {path!r} is a {type(obj).__name__}, not a callable")
    return obj


def call_factory(key: str, path: str, /, *args: Any, **kwargs: Any) -> Any:
    """``resolve(key, path)(*args, **kwargs)``; an exception inside the factory becomes a one-line ConfigError."""
    factory = resolve(key, path)
    try:
        return factory(*args, **kwargs)
    except Exception as exc:
        raise ConfigError(f"{key}: {path!r} raised {one_line(exc)}") from None


__all__ = ["IMPORT_PATH", "IMPORT_DIRS", "is_import_path", "check_name", "add_import_dir", "import_dirs", "resolve",
           "call_factory"]
