"""Discovery of third-party ops through Python entry points.

An installed package defines its ops (:func:`dualgraph.define_op`) in a module named in its
own ``pyproject.toml``::

    [project.entry-points."dualgraph.plugins"]
    my_ops = "my_package.dualgraph_ops"

Plugins are loaded once per process, before any frontend runs and before rules are looked
up. Every definition a plugin makes is attributed to its distribution (name and version;
``dualgraph plugins`` lists them). A plugin that fails to import is reported once on stderr
with its name (with the traceback when ``DUALGRAPH_DEBUG=1``, which ``--debug`` sets), the
ops it had defined before failing are withdrawn, and everything that does not need them keeps
working; an error about a missing op names the failed plugins. ``DUALGRAPH_NO_PLUGINS=1``
disables loading altogether.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

ENTRY_POINT_GROUP = "dualgraph.plugins"


@dataclass(frozen=True)
class PluginInfo:
    """One ``dualgraph.plugins`` entry point and what became of it."""

    name: str
    value: str          # module (or module:attribute) the entry point names
    source: str         # distribution name and version, as op definitions record it
    error: str | None   # None when it loaded


LOADED: list[PluginInfo] = []
_state = {"loaded": False}


def plugins_disabled() -> bool:
    return os.environ.get("DUALGRAPH_NO_PLUGINS", "") not in ("", "0")


def load_plugins() -> list[PluginInfo]:
    """Import every ``dualgraph.plugins`` entry point once; returns what was found."""
    if _state["loaded"]:
        return LOADED
    _state["loaded"] = True
    if plugins_disabled():
        return LOADED
    from . import ops  # noqa: F401  (the built-ins first: plugins are checked against them)
    from .op_registry import loading_plugin, snapshot
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        source = _distribution(ep)
        restore = snapshot()
        try:
            with loading_plugin(source):
                ep.load()
        except (Exception, SystemExit) as exc:  # a broken plugin must not take down commands that never use it
            restore()  # nothing half: its definitions and replacements are withdrawn
            error = f"{type(exc).__name__}: {exc}"
            LOADED.append(PluginInfo(ep.name, ep.value, source, error))
            hint = "" if _debug() else " (DUALGRAPH_DEBUG=1 or --debug shows the traceback)"
            print(f"dualgraph: warning: plugin '{ep.name}' ({source}) failed to load and is skipped: "
                  f"{error}{hint}", file=sys.stderr)
            if _debug():
                traceback.print_exc()
            continue
        LOADED.append(PluginInfo(ep.name, ep.value, source, None))
    return LOADED


def failed_plugins_note() -> str:
    """A clause for missing-op errors naming the plugins that failed to load ('' if none)."""
    if plugins_disabled():
        return "; note: plugins are disabled (DUALGRAPH_NO_PLUGINS is set)"
    failed = [p for p in load_plugins() if p.error]
    if not failed:
        return ""
    return "; note: " + ", ".join(f"plugin '{p.name}' ({p.source}) failed to load ({p.error})" for p in failed)


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return f"plugin {ep.name}"
    return f"{dist.metadata['Name']} {dist.version}"


def _debug() -> bool:
    return os.environ.get("DUALGRAPH_DEBUG", "") not in ("", "0")
