"""The plugin manager: built-in and third-party plugins, all found through entry points."""

from __future__ import annotations

import functools
import importlib.metadata
import logging

import pluggy

from green_mlops import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "green_mlops"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus the plugins that failed to load and why (for doctor/provenance)."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}


def create_plugin_manager(disabled: frozenset[str] = frozenset()) -> PluginManager:
    """A new manager with every plugin of the ``green_mlops`` entry-point group, less ``disabled``.

    Built-in plugins are declared in green-mlops' own ``pyproject.toml`` under that group, so they
    load exactly like third-party ones. A plugin that fails to import is skipped and recorded in
    ``load_errors`` (a broken plugin must not stop measurement by the others).
    """
    pm = PluginManager()
    for name in disabled:
        pm.set_blocked(name)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            pm.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning("green-mlops: plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
            continue
        pm.register(plugin, name=ep.name)
    return pm


@functools.lru_cache(maxsize=8)
def get_plugin_manager(disabled: frozenset[str] = frozenset()) -> PluginManager:
    """The process-wide manager for a set of disabled plugins (entry points are scanned once)."""
    return create_plugin_manager(disabled)
