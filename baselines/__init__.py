"""Learned baselines on the project's own leave-one-out split: SASRec, GRU4Rec and TIGER.

Each family runs alone (``python -m baselines.sasrec ...``) or through the dispatcher
(``python -m baselines --model sasrec,gru4rec,tiger ...``); see docs/baselines.md.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from utils import DataError

FAMILIES = ("sasrec", "gru4rec", "tiger")


def family(name: str) -> ModuleType:
    """The module of one family by name; an unknown name is refused."""
    key = name.strip().lower()
    if key not in FAMILIES:
        raise DataError(f"--model: unknown model {name!r}; expected names from {list(FAMILIES)}")
    return importlib.import_module(f"baselines.{key}")
