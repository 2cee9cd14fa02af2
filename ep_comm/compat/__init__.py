"""DeepEP compatibility: the names DeepEP users import, and an opt-in ``deep_ep`` alias.

``ep_comm`` itself is DeepEP-shaped (``import ep_comm as deep_ep`` runs v1 ``Buffer`` code and
v2 ``ElasticBuffer`` code). This package adds what lives outside that namespace in DeepEP:

* ``EventHandle`` (``deep_ep.utils.EventHandle``; ``EventOverlap(EventHandle())`` works);
* ``install_deep_ep()``: after it, ``import deep_ep``, ``from deep_ep import Buffer, Config``
  and ``from deep_ep.utils import EventOverlap, EventHandle`` resolve to ep_comm. Nothing is
  installed unless called (and a real ``deep_ep`` already imported is never replaced);
* ``deepep_c``: the names DeepEP's helper modules import from its compiled ``_C``, answered by
  ep_comm (used by ``bench/deepep_tests.sh`` to run DeepEP's own tests);
* ``kineto``: DeepEP's kernel-name profiling mapped to ep_comm's kernel names.
"""
from __future__ import annotations

import sys

from ep_comm.compat.event import EventHandle

ALIAS_MODULES = ("deep_ep", "deep_ep.utils", "deep_ep.buffer")


def install_deep_ep(force: bool = False) -> None:
    """Make ``import deep_ep`` (and ``deep_ep.utils``, ``deep_ep.buffer``) resolve to ep_comm.

    Args:
        force: replace a ``deep_ep`` that is already imported (by default that raises, so a
            real DeepEP in the process is never swapped out silently).
    """
    import importlib
    present = sys.modules.get("deep_ep")
    if present is not None and not getattr(present, "EP_COMM_ALIAS", False) and not force:
        raise RuntimeError("a real deep_ep module is already imported; pass force=True to "
                           "replace it with ep_comm's alias")
    for name in ALIAS_MODULES:
        sys.modules[name] = importlib.import_module("ep_comm.compat." + name)


def uninstall_deep_ep() -> None:
    """Remove the alias installed by ``install_deep_ep`` (leaves other modules alone)."""
    for name in ALIAS_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "EP_COMM_ALIAS", False):
            del sys.modules[name]


__all__ = ["EventHandle", "install_deep_ep", "uninstall_deep_ep"]
