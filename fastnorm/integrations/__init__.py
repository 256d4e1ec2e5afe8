"""Drop-in normalizers for the RL frameworks users already train with, one module per framework.

Each module imports its framework on import (never ``import fastnorm`` itself); a missing framework
raises an ImportError naming the extra to install, e.g. ``pip install 'fastnorm[rsl_rl]'``.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType
from typing import Any


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module`` (the framework) or raises an ImportError that names fastnorm's extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"fastnorm.integrations.{extra} needs {module!r}, which is not installed: "
            f"pip install 'fastnorm[{extra}]'") from error


# The options `fixes=True` turns on in every integration: RunningNorm's own defaults for the
# warm-started EMA (momentum), the std floor (min_std) and the output clamp (clip).
FIXES = ("momentum", "min_std", "clip")


def fixes(**host_options: Any) -> dict[str, Any]:
    """RunningNorm's defaults for FIXES, with the host's own values where it has one (e.g. rl_games'
    clip of 5): the keyword arguments an integration passes to RunningNorm when ``fixes=True``."""
    from fastnorm.running_norm import RunningNorm

    defaults = inspect.signature(RunningNorm).parameters
    return {**{name: defaults[name].default for name in FIXES}, **host_options}
