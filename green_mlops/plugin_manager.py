"""The plugin manager: the built-in plugins by module name, third-party ones by entry point.

Built-ins are registered from :data:`DEFAULT_PLUGINS` (datasette's ``DEFAULT_PLUGINS``, pytest's
``default_plugins``), so they load from an uninstalled copy too; other distributions add plugins
through the ``green_mlops`` entry-point group. Any of them can be disabled by name. Plugins are
isolated from each other: one that fails to import, misspells a hook, or whose hook raises or
returns something odd is recorded (for ``green-mlops doctor`` and the run's provenance) and the
others go on.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from green_mlops import __version__, hookspecs
from green_mlops.log import warn_user

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "HookFailure",
    "PluginManager",
    "call_hook",
    "create_plugin_manager",
    "get_plugin_manager",
]

ENTRY_POINT_GROUP = "green_mlops"

# The built-in plugins, registered under the last part of the module name (in this order).
DEFAULT_PLUGINS = (
    "green_mlops.plugins.constant_intensity",
    "green_mlops.plugins.cpu_estimate",
    "green_mlops.plugins.electricitymaps",
    "green_mlops.plugins.nvml",
    "green_mlops.plugins.ram_estimate",
    "green_mlops.plugins.rapl",
    "green_mlops.plugins.slurm_energy",
    "green_mlops.plugins.static_intensity",
    "green_mlops.plugins.uk_carbon_intensity",
    "green_mlops.plugins.watttime",
)

BUILTIN = f"green-mlops {__version__}"

T = TypeVar("T")


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, plus where each plugin came from and the ones that failed to load."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        # every plugin name seen (loaded, failed or disabled) -> "distribution version" of it
        self.origins: dict[str, str] = {}


@dataclass(frozen=True)
class HookFailure:
    """One plugin's hook implementation that raised or returned something unusable."""

    plugin: str
    hook: str
    error: str

    def describe(self) -> str:
        return f"plugin {self.plugin}: hook {self.hook} failed ({self.error})"


def create_plugin_manager(disabled: frozenset[str] = frozenset()) -> PluginManager:
    """A new manager with the built-in plugins and those of the ``green_mlops`` entry-point
    group, less the ``disabled`` names.

    A plugin that fails to import, or that implements a hook no spec declares (a misspelled
    name, found by pluggy's ``check_pending``), is skipped and recorded in ``load_errors``: a
    broken plugin must not stop measurement by the others. A name already taken, or a module
    already registered (a distribution listing a built-in again), is not registered twice.
    """
    pm = PluginManager()
    for name in disabled:
        pm.set_blocked(name)
    for module in DEFAULT_PLUGINS:
        load = functools.partial(importlib.import_module, module)
        _add(pm, module.rpartition(".")[2], module, BUILTIN, load)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in DEFAULT_PLUGINS:  # a built-in listed again is the built-in
            _add(pm, ep.name, ep.value, _distribution(ep), ep.load)
    for name in sorted(disabled - set(pm.origins)):  # a misspelled name disables nothing
        close = difflib.get_close_matches(name, pm.origins, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warn_user(
            f"GREEN_MLOPS_DISABLE_PLUGINS names {name!r}, which is no plugin here{hint}: it "
            f"disables nothing. The plugins are {', '.join(sorted(pm.origins))} "
            "(`green-mlops doctor` lists them)"
        )
    return pm


def _add(pm: PluginManager, name: str, value: str, origin: str, load: Callable[[], Any]) -> None:
    if name in pm.origins:
        return  # the name is taken (by a built-in, or an earlier distribution)
    pm.origins[name] = origin
    if pm.is_blocked(name):
        return
    try:
        plugin = load()
        if pm.get_name(plugin) is not None:
            del pm.origins[name]  # the same object under another name: registered already
            return
        pm.register(plugin, name=name)
    except Exception as exc:
        _refuse(pm, name, value, f"{type(exc).__name__}: {exc}")
        return
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        _refuse(pm, name, value, _unknown_hook(exc))


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


@functools.lru_cache(maxsize=8)
def get_plugin_manager(disabled: frozenset[str] = frozenset()) -> PluginManager:
    """The process-wide manager for a set of disabled plugins (entry points are scanned once)."""
    return create_plugin_manager(disabled)


def call_hook(
    pm: pluggy.PluginManager, hook: str, kind: type[T] | tuple[type[T], ...], **kwargs: Any
) -> tuple[list[tuple[str, T]], list[HookFailure]]:
    """Call each plugin's implementation of ``hook`` on its own, in registration order
    (built-ins first), and collect the items it returns: ``None`` or an iterable of ``kind``
    instances.

    An implementation that raises or returns anything else is recorded as a
    :class:`HookFailure` (and logged) and contributes nothing; the others are still called.
    Returns ``([(plugin name, item), ...], failures)``. Hook wrappers are not called: these
    hooks collect offers, there is nothing to wrap.
    """
    caller = getattr(pm.hook, hook)
    items: list[tuple[str, T]] = []
    failures: list[HookFailure] = []
    for impl in caller.get_hookimpls():
        if impl.hookwrapper or impl.wrapper:
            continue
        try:
            result = impl.function(*(kwargs[arg] for arg in impl.argnames))
            offered = _items(result, kind)
        except Exception as exc:
            failure = HookFailure(impl.plugin_name, hook, f"{type(exc).__name__}: {exc}")
            log.warning("green-mlops: %s", failure.describe())
            failures.append(failure)
            continue
        items.extend((impl.plugin_name, item) for item in offered)
    return items, failures


def _items(result: object, kind: type[T] | tuple[type[T], ...]) -> list[T]:
    if result is None:
        return []
    if isinstance(result, (str, bytes)) or not isinstance(result, Iterable):
        raise TypeError(f"returned {type(result).__name__}, expected a list")
    items = list(result)
    for item in items:
        if not isinstance(item, kind):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TypeError(f"returned a {type(item).__name__} in its list, expected {names}")
    return items


def _refuse(pm: PluginManager, name: str, value: str, error: str) -> None:
    if pm.has_plugin(name):
        pm.unregister(name=name)
    pm.load_errors[name] = error
    log.warning("green-mlops: plugin %r (%s) failed to load: %s", name, value, error)


def _unknown_hook(exc: pluggy.PluginValidationError) -> str:
    """'unknown hook green_mlops_meter (did you mean green_mlops_meters?)' from pluggy's error."""
    specs = [name for name in dir(hookspecs) if name.startswith(hookspecs.PROJECT_NAME + "_")]
    words = str(exc).replace("'", " ").split()
    hook = next((w for w in words if w.startswith(hookspecs.PROJECT_NAME + "_")), "")
    close = difflib.get_close_matches(hook, specs, n=1) if hook else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown hook {hook or '?'}{hint}: no such hook spec in green_mlops.hookspecs"
