"""Entry-point plug-ins: load every entry point of a group, report the broken ones, keep the rest.

A plug-in whose import fails must neither take ``kebench list`` down with a traceback nor vanish
silently on the next call: each failure is kept (distribution, entry point, one-line error) for the
command line to print, and the group is marked loaded only after every entry point was tried.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass


@dataclass(frozen=True)
class PluginFailure:
    group: str
    entry_point: str  # "name = module:attr"
    distribution: str
    error: str  # one line

    def describe(self) -> str:
        return f"plugin '{self.entry_point}' from distribution '{self.distribution}' failed to load: {self.error}"


@dataclass(frozen=True)
class LoadedPlugin:
    group: str
    name: str
    module: str
    distribution: str


_FAILURES: dict[tuple[str, str], PluginFailure] = {}
_LOADED: dict[tuple[str, str], LoadedPlugin] = {}


def _distribution(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    name = getattr(dist, "name", None) or (dist.metadata["Name"] if dist is not None else None)
    return str(name) if name else "?"


def load_group(group: str) -> None:
    """Import every entry point of ``group`` (each registers itself on import); failures are recorded."""
    for entry in importlib.metadata.entry_points(group=group):
        key = (group, f"{entry.name} = {entry.value}")
        if key in _LOADED or key in _FAILURES:
            continue
        try:
            entry.load()
        except Exception as exc:  # noqa: BLE001 - any plug-in error is reported, never fatal
            message = " ".join(str(exc).split()) or type(exc).__name__
            _FAILURES[key] = PluginFailure(group, key[1], _distribution(entry), f"{type(exc).__name__}: {message}")
        else:
            _LOADED[key] = LoadedPlugin(group, entry.name, entry.value.split(":")[0], _distribution(entry))


def failures(group: str | None = None) -> list[PluginFailure]:
    return [f for (g, _), f in sorted(_FAILURES.items()) if group is None or g == group]


def loaded(group: str | None = None) -> list[LoadedPlugin]:
    return [p for (g, _), p in sorted(_LOADED.items()) if group is None or g == group]


def distribution_of_module(module: str) -> str | None:
    """The plug-in distribution whose entry point imported ``module`` (or a parent package of it)."""
    for plugin in _LOADED.values():
        if module == plugin.module or module.startswith(plugin.module + ".") or plugin.module.startswith(module + "."):
            return plugin.distribution
    return None
