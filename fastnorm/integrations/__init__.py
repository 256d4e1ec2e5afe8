"""Drop-in normalizers for the RL frameworks users already train with, one module per framework.

Each module imports its framework on import (never ``import fastnorm`` itself); a missing framework
raises an ImportError naming the extra to install, e.g. ``pip install 'fastnorm[rsl_rl]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module`` (the framework) or raises an ImportError that names fastnorm's extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"fastnorm.integrations.{extra} needs {module!r}, which is not installed: "
            f"pip install 'fastnorm[{extra}]'") from error
