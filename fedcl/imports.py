"""Resolve user-named modules and objects (`module:attr` or dotted `module.attr`) with
one-line errors."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from fedcl.errors import ConfigError


def load_object(path: str, *, what: str, expect: type | None = None) -> Any:
    """Import and return the object at `path` ('pkg.mod:attr' or 'pkg.mod.attr'); with `expect`,
    only an instance of that class. Raises a one-line `ConfigError` naming `what` otherwise."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{what} '{path}' is not an import path like 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    # TypeError and ValueError: a relative or malformed name ('.mod', 'a..b').
    except (ImportError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{what} '{path}': cannot import module '{module_name}' ({exc})"
        ) from None
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{what} '{path}': module '{module_name}' has no '{attr}'") from None
    if expect is not None and not isinstance(found, expect):
        raise ConfigError(
            f"{what} '{path}' is not a {expect.__qualname__} (it is a {type(found).__name__})"
        )
    return found


def import_modules(modules: Sequence[str]) -> None:
    """Import the config's `imports` (user modules that register strategies), one-line errors."""
    for name in modules:
        try:
            importlib.import_module(name)
        except (ImportError, TypeError, ValueError) as exc:
            raise ConfigError(f"imports: cannot import module '{name}' ({exc})") from None
