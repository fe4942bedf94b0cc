"""Faults for the processes a test or ``scripts/fault_drill.py`` launches with ``PYTHONPATH`` set to
this folder (Python imports ``sitecustomize`` at start-up).

``RND1_FAULT_SLOW="module:Class.method:seconds,..."`` makes each named function sleep before it
runs (a save longer than torchrun's close timeout, a slow start-up). The function is wrapped as
soon as its module is imported."""

import builtins
import os
import sys
import time

_SPECS = [spec.split(":") for spec in os.environ.get("RND1_FAULT_SLOW", "").split(",") if spec]
_done: set = set()


def _wrap(module, qualname, seconds):
    owner_name, _, attr = qualname.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    real = getattr(owner, attr)

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    setattr(owner, attr, slow)


def _patch_loaded():
    for mod, qualname, seconds in _SPECS:
        if (mod, qualname) not in _done and mod in sys.modules and hasattr(sys.modules[mod], qualname.split(".")[0]):
            _done.add((mod, qualname))
            _wrap(sys.modules[mod], qualname, float(seconds))


if _SPECS:
    _real_import = builtins.__import__

    def _import(*args, **kwargs):
        module = _real_import(*args, **kwargs)
        if len(_done) < len(_SPECS):
            _patch_loaded()
        return module

    builtins.__import__ = _import
