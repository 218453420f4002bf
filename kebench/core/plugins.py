"""Entry-point plug-ins: load every entry point of a group, report the broken ones, keep the rest.

A plug-in whose import fails must neither take ``kebench list`` down with a traceback nor vanish
silently on the next call: each failure is kept (distribution, entry point, one-line error) for the
command line to print, and the group is marked loaded only after every entry point was tried.

Issue 31: a plug-in that calls ``sys.exit`` at import is a failure like any other (it used to end every
command, silently, with its exit code); one that registers a name kebench already has (``baft``) raises
``NameTaken``, is refused, and the name is remembered (``refused_claim``) so that every command that
uses the name says so instead of silently running the built-in.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass


class NameTaken(ValueError):
    """A registration under a name another module already registered (a plug-in naming a built-in method)."""

    def __init__(self, kind: str, name: str, owner: str) -> None:
        super().__init__(f"{kind} {name!r} is already registered by {owner}; choose another name")
        self.kind, self.name, self.owner = kind, name, owner


@dataclass(frozen=True)
class PluginFailure:
    group: str
    entry_point: str  # "name = module:attr"
    distribution: str
    error: str  # one line
    #: (kind, name) when the plug-in was refused for registering a name that was taken (``NameTaken``)
    claims: tuple[str, str] | None = None

    def describe(self) -> str:
        return f"plugin '{self.entry_point}' from distribution '{self.distribution}' failed to load: {self.error}"

    def who(self) -> str:
        return f"plug-in '{self.entry_point}' (distribution '{self.distribution}')"


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
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any plug-in error is reported, never fatal;
            # SystemExit too: a plug-in's sys.exit(3) at import used to end every command with no output
            claims = (exc.kind, exc.name) if isinstance(exc, NameTaken) else None
            _FAILURES[key] = PluginFailure(group, key[1], _distribution(entry), _one_line(exc), claims)
        else:
            _LOADED[key] = LoadedPlugin(group, entry.name, entry.value.split(":")[0], _distribution(entry))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r}) while being imported"
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {message}"


def refused_claim(kind: str, name: str) -> PluginFailure | None:
    """The refused plug-in that tried to register ``name`` as a ``kind`` (method, benchmark, model), if any."""
    return next((f for f in _FAILURES.values() if f.claims == (kind, name)), None)


def check_unclaimed(kind: str, name: str) -> None:
    """A one-line error when a refused plug-in also registers ``name``: using the name would silently run
    kebench's own ``kind`` where the user may have meant the plug-in's."""
    from kebench.core.errors import KebenchError

    failure = refused_claim(kind, name)
    if failure is not None:
        raise KebenchError(f"{kind} '{name}' is ambiguous: {failure.who()} also registers '{name}', a name "
                           f"kebench already has, and was refused; rename the plug-in's {kind} or uninstall it "
                           "(kebench list shows it)")


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
