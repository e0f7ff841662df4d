"""caitsearch: hardware-aware CAIT compression (ATME + CDCP) of timm Vision Transformers.

The public names load their modules on first use (PEP 562), so importing the package, and with it
the command line, does not pay for torch and timm before a command needs them."""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .errors import CaitsearchError, ConfigError

__version__ = "0.1.0"
__all__ = [
    "BlockConfig", "CaitViT", "CaitsearchError", "CompressionConfig", "ConfigError", "ModelSpec",
    "compress", "create_model", "materialize",
]
_LAZY = {"CaitViT": "compress", "compress": "compress", "materialize": "compress", "BlockConfig": "config",
         "CompressionConfig": "config", "ModelSpec": "models", "create_model": "models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `caitsearch.compress` the function: importing the subpackage of that name binds the
    module here, which the eager `from .compress import compress` used to overwrite."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compress" and isinstance(value, types.ModuleType):
            value = value.compress
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
