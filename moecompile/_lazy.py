"""Modules imported at first use. `import moecompile` should cost little beyond `import torch`; networkx alone
takes ~0.2 s (its backend registry) and is needed only while a model compiles."""
from __future__ import annotations

import importlib


class LazyModule:
    """Stands for the module `name`, imported at the first attribute read."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


nx = LazyModule("networkx")
