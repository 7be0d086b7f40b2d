"""Heavy third-party packages imported on first use, so that a command that stops on a bad input (a missing
file, a typo in an option) says so in a second or two instead of after the imports of open_clip (with timm
and torchvision) and torchmetrics, which take several seconds together."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """A stand-in for module ``name`` that imports it on the first attribute access."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_lazy_name"] = name

    def _load(self) -> ModuleType:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        self.__dict__.update(module.__dict__)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)


def lazy_module(name: str) -> Any:
    """``open_clip = lazy_module("open_clip")`` (under ``if not TYPE_CHECKING``, so type checkers see the real
    module): the import happens when an attribute is first read."""
    return LazyModule(name)
