"""Objectives (``objective.py``: the interface and registry; ``ar.py``, ``mdlm.py``, ``a2d.py``),
the noising process (``corruption.py``) and the loss (``loss.py``).

The registry module is imported first so that importing any single objective module works."""

from rnd1.diffusion.objective import OBJECTIVES, Objective, Targets, get_objective  # noqa: F401
