"""Optional packages (the extras in pyproject.toml), imported only when a feature asks for them, so
that nobody pays for a package they do not use; a missing one is one line naming the key that asked
for it and the install command."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError


def optional(module: str, wanted_by: str, extra: str, package: str | None = None,
             instead: str | None = None) -> ModuleType:
    """``import module``, or a ConfigError: ``<wanted_by> needs <package>: pip install -e '.[extra]'``
    (``package``: the distribution to install, when it is not the module's top-level name;
    ``instead``: the other way out, e.g. the key that turns the feature off)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = package or module.split(".")[0]
        other = f", or set {instead}" if instead else ""
        raise ConfigError(f"{wanted_by} needs {package}, which is not installed: pip install {package} "
                          f"(or pip install -e '.[{extra}]'){other}", shared=True) from None
