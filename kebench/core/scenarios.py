"""Scenario kinds, declared once: what each kind is called, what it takes, how it enters the cell id and tables.

A scenario kind says how a cell's cases become streams of edit calls (single, continual(T), batched(B, T),
...).  Its declaration lives here, in the base layer, because every layer reads it: grid files and
``kebench edit`` validate against it, the cell id hashes its parameters, hyperparameter YAMLs may hold a
block named after it, the store accepts only declared kinds, and the tables and the leaderboard take its
label, table shape and curve from it.  How the streams are formed and run is the orchestrator's
(``orchestrator.scenarios.register_streams``), or the declaration's own ``streams`` for a plug-in::

    from kebench import ScenarioKind, ScenarioParam, Stream, register_scenario

    def reversed_streams(cases, scenario):      # streams of T cases, edited last-first, `rounds` passes
        return [Stream(tuple((case,) for case in reversed(cases[i : i + scenario.T])) * scenario.param("rounds"))
                for i in range(0, len(cases), scenario.T)]

    register_scenario(ScenarioKind("reversed", "streams of T cases edited last-first", sets=("T",),
                                   params=(ScenarioParam("rounds", 1),), label="reversed(T={T},rounds={rounds})",
                                   streams=reversed_streams))

(``tests/test_new_scenario.py`` runs exactly this kind in a grid.)

Every kind has the stream-shape columns ``T`` and ``B`` (integers in the store's schema; 1 unless the kind
lets a grid set them, ``sets``).  A parameter beyond them (``params``) enters the cell id and the label
but is not a store column: a table that must tell its values apart needs one, which is a schema change.
A kind that scores a stream more than once (lifelong's checkpoints) tells its rows apart by the case
rows' ``checkpoint`` column (the number of edits made in the stream when the row was scored; NULL for
kinds that score a stream once).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kebench.core.errors import KebenchError

#: the stream-shape parameters every kind has, each a store column (``results.store``)
SHAPE_PARAMS = ("T", "B")


@dataclass(frozen=True)
class ScenarioParam:
    """A parameter a scenario kind takes beyond T and B: a positive integer (``many=False``) or a non-empty
    list of positive integers (``many=True``, e.g. checkpoints)."""

    name: str
    default: Any = None  # the value when a grid leaves it out; None: a grid must set it
    description: str = ""
    many: bool = False

    def check(self, value: Any, kind: str) -> Any:
        """The value as the cell id hashes it (a list becomes a tuple); a one-line error otherwise."""
        items = list(value) if self.many and isinstance(value, (list, tuple)) else [value]
        if self.many and not isinstance(value, (list, tuple)):
            raise KebenchError(f"scenario {kind}: {self.name} must be a list of positive integers, got {value!r}")
        if not items or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in items):
            what = "a non-empty list of positive integers" if self.many else "a positive integer"
            raise KebenchError(f"scenario {kind}: {self.name} must be {what}, got {value!r}")
        return tuple(items) if self.many else items[0]


@dataclass(frozen=True)
class TableShape:
    """A kind's metric table (``results.shapes``): one block per ``block_keys`` value, one column group per
    ``group_keys`` value, the ``metrics`` a block shows when its cells measured none of the others."""

    title: str
    block_keys: tuple[str, ...]
    group_keys: tuple[str, ...]
    metrics: tuple[str, ...] = ("rel", "gen", "loc")


@dataclass(frozen=True)
class ScenarioKind:
    """One scenario kind.  ``label`` and ``shape`` are ``str.format`` templates over T, B and ``params``:
    ``label`` names a cell's scenario in logs and titles, ``shape`` a leaderboard group."""

    name: str
    description: str
    #: which of T and B a grid may set for this kind (the others must stay 1)
    sets: tuple[str, ...] = ()
    #: why the others must stay 1, for the one-line error (e.g. "edits one case per call: B must be 1")
    fixed_note: str = ""
    params: tuple[ScenarioParam, ...] = ()
    label: str = "{kind}"
    shape: str = "{kind}"
    #: a downstream check (PIQA, paper Table 8) may be scored after each of its streams
    downstream: bool = True
    #: it may train independent single edits K at a time (``parallel_cases``): only one edit per stream
    parallel_cases: bool = False
    table: TableShape | None = None
    #: the leaderboard draws each metric against this parameter, one figure per ``curve_title``
    curve: str | None = None
    curve_title: str = "{kind}"
    order: int = 100  # where its groups sort in the leaderboard
    #: how the cases become streams (``orchestrator.scenarios.Stream``), for a plug-in kind; the built-in
    #: kinds' logic is registered in ``orchestrator.scenarios``, which this layer does not import
    streams: Callable[..., Any] | None = field(default=None, compare=False)
    #: how many cases one stream takes, from {"T", "B", *params} (a cell's n must be a multiple of it); None: T·B
    stream_size: Callable[[Mapping[str, Any]], int] | None = field(default=None, compare=False)
    #: how many case scorings one stream makes, from {"T", "B", *params} (lifelong: every checkpoint scores
    #: every case edited so far); None: each case once.  ``kebench plan`` prices the scoring with it
    scored_size: Callable[[Mapping[str, Any]], int] | None = field(default=None, compare=False)
    #: checks across the parameters (one-line ``KebenchError``s) and their canonical values, from
    #: {"T", "B", *params} to the kind's own parameters as the cell id hashes them; None: as given
    normalize: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = field(default=None, compare=False)
    #: B > 1 only for methods whose edit call edits its cases jointly (``Editor.batch_edits``): a method that
    #: applies a call's cases one after another would run B = 1 under a B > 1 label
    joint_calls: bool = False

    def cases_per_stream(self, T: int, B: int, values: Mapping[str, Any] | None = None) -> int:
        return self.stream_size({"T": T, "B": B, **(values or {})}) if self.stream_size else T * B

    def scorings_per_stream(self, T: int, B: int, values: Mapping[str, Any] | None = None) -> int:
        if self.scored_size is None:
            return self.cases_per_stream(T, B, values)
        return self.scored_size({"T": T, "B": B, **(values or {})})

    def param(self, name: str) -> ScenarioParam:
        for param in self.params:
            if param.name == name:
                return param
        raise KebenchError(f"scenario {self.name} has no parameter '{name}'; it takes "
                           f"{', '.join(self.parameter_names()) or 'none'}")

    def parameter_names(self) -> tuple[str, ...]:
        """What a grid entry or ``kebench edit`` may set for this kind."""
        return (*self.sets, *(param.name for param in self.params))

    def format(self, template: str, T: int, B: int, values: Mapping[str, Any] | None = None) -> str:
        extra = {name: (list(value) if isinstance(value, tuple) else value) for name, value in (values or {}).items()}
        return template.format(kind=self.name, T=T, B=B, **extra)


_REGISTRY: dict[str, ScenarioKind] = {}


def register_scenario(kind: ScenarioKind) -> ScenarioKind:
    """Declare a scenario kind; declaring the identical kind again (a re-imported module) is a no-op."""
    if any(name not in SHAPE_PARAMS for name in kind.sets):
        raise ValueError(f"scenario {kind.name!r}: sets names T and/or B, got {kind.sets}")
    clash = [param.name for param in kind.params if param.name in SHAPE_PARAMS + ("kind", "downstream", "downstream_n",
                                                                                    "parallel_cases", "checkpoint")]
    if clash:
        raise ValueError(f"scenario {kind.name!r}: parameter {clash[0]!r} is a name every scenario has")
    existing = _REGISTRY.get(kind.name)
    if existing is not None and existing != kind:
        raise ValueError(f"scenario {kind.name!r} registered twice with different declarations")
    _REGISTRY[kind.name] = kind
    return kind


def get_scenario_kind(name: str) -> ScenarioKind:
    if name not in _REGISTRY:
        raise KebenchError(f"unknown scenario '{name}'; known: {', '.join(scenario_names())}")
    return _REGISTRY[name]


def scenario_names() -> list[str]:
    """Declared kinds in declaration order (the built-ins first)."""
    return list(_REGISTRY)


def scenario_kinds() -> list[ScenarioKind]:
    return list(_REGISTRY.values())


def is_scenario(name: str) -> bool:
    return name in _REGISTRY


# The WISE/BaFT protocol's three kinds (their stream logic: orchestrator/scenarios.py).
SINGLE = register_scenario(ScenarioKind(
    "single", "edit one case, evaluate it, restore the model exactly",
    fixed_note="edits one case at a time: T and B must be 1", downstream=False, parallel_cases=True,
    table=TableShape("Single editing", ("model",), ("benchmark", "split"), ("rel", "loc")), order=0,
))
CONTINUAL = register_scenario(ScenarioKind(
    "continual", "streams of T cases edited one after another, evaluated after the T-th edit, then restored",
    sets=("T",), fixed_note="edits one case per call: B must be 1 (use batched)", label="continual(T={T})",
    shape="continual T={T}", table=TableShape("Continual editing (evaluated after T sequential edits)",
                                              ("model", "benchmark", "split"), ("T",)),
    curve="T", curve_title="continual", order=1,
))
BATCHED = register_scenario(ScenarioKind(
    "batched", "streams of T edit calls of B cases each, evaluated after the stream, then restored",
    sets=("T", "B"), label="batched(B={B},T={T})", shape="batched B={B} T={T}",
    table=TableShape("Batched editing (T sequential edits of B cases each)", ("model", "benchmark", "split", "B"),
                     ("T",)),
    curve="T", curve_title="batched B={B}", order=2,
))


def _lifelong_values(values: Mapping[str, Any]) -> Mapping[str, Any]:
    """lifelong's checks: N a multiple of B, checkpoints strictly ascending multiples of B up to N; N itself is
    always the last checkpoint (added when the grid leaves it out, so both spellings are one cell): the
    edits after the last listed checkpoint would otherwise be made and never scored."""
    n, b, checkpoints = values["N"], values["B"], tuple(values["checkpoints"])
    if n % b:
        raise KebenchError(f"scenario lifelong: N={n} is not a multiple of B={b} (the stream is edited in calls of "
                           f"B cases)")
    if any(later <= earlier for earlier, later in zip(checkpoints, checkpoints[1:])):
        raise KebenchError(f"scenario lifelong: checkpoints must be strictly ascending, got {list(checkpoints)}")
    beyond = [c for c in checkpoints if c > n]
    if beyond:
        raise KebenchError(f"scenario lifelong: checkpoints: {beyond[0]} exceeds N={n} (a checkpoint counts the edits "
                           "made so far)")
    off = [c for c in checkpoints if c % b]
    if off:
        raise KebenchError(f"scenario lifelong: checkpoints: {off[0]} is not a multiple of B={b} (scores are taken "
                           "between calls of B cases)")
    return {"N": n, "checkpoints": checkpoints if checkpoints[-1] == n else (*checkpoints, n)}


# AlphaEdit's protocol (Fang et al., ICLR 2025): thousands of edits in calls of B, never rolled back, scored as
# they accumulate.  T stays 1 (the stream's length is N); a row's ``checkpoint`` says when it was scored.
LIFELONG = register_scenario(ScenarioKind(
    "lifelong", "one stream of N edits in calls of B cases, never restored until its end; at each checkpoint "
                "every edit made so far is scored",
    sets=("B",), fixed_note="edits one stream of N cases: T must be 1 (set N)",
    params=(ScenarioParam("N", description="edits in the stream (a cell's n must be a multiple of N)"),
            ScenarioParam("checkpoints", many=True,
                          description="after how many edits every edit so far is scored (ascending, multiples of B, "
                                      "at most N; N is always the last)")),
    label="lifelong(N={N},B={B},checkpoints={checkpoints})", shape="lifelong B={B}",
    table=TableShape("Lifelong editing (every edit so far, scored after each checkpoint of one never-restored stream)",
                     ("model", "benchmark", "split", "B"), ("checkpoint",), ("rel", "gen", "loc")),
    curve="checkpoint", curve_title="lifelong B={B}", order=3,
    stream_size=lambda values: values["N"], scored_size=lambda values: sum(values["checkpoints"]),
    normalize=_lifelong_values, joint_calls=True,
))
