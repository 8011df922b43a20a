"""Discovery of third-party rules through Python entry points.

An installed package registers its evaluation and dual-layer rules by declaring, in its
own ``pyproject.toml``::

    [project.entry-points."dualgraph.plugins"]
    my_ops = "my_package.dualgraph_rules"

Loading the named module must register the rules (``@register_eval``, ``@register_dual``).
Plugins are loaded once, lazily, the first time rules are looked up.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import DualgraphError

ENTRY_POINT_GROUP = "dualgraph.plugins"
_loaded = False


def load_plugins() -> list[str]:
    """Import every ``dualgraph.plugins`` entry point once; returns their names."""
    global _loaded
    if _loaded:
        return []
    _loaded = True
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not look like a dualgraph bug
            raise DualgraphError(f"plugin '{ep.name}' ({ep.value}) failed to load: "
                                 f"{type(exc).__name__}: {exc}; fix or uninstall that package") from exc
        names.append(ep.name)
    return names
