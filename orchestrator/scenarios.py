"""Editing scenarios: how a cell's cases become streams of edit calls, and the loop that runs them.

The kinds are declared once in ``kebench.core.scenarios`` (single, continual(T), batched(B, T), and any a
plug-in declares); this module holds the ``Scenario`` value a cell carries and each kind's stream logic:

* single: edit one case, evaluate it, restore.
* continual(T): streams of T cases; apply the T edits one after another with one editor, then evaluate
  all T cases (locality against the unedited model), restore, next stream.
* batched(B, T): streams of T batches of B cases; each batch is one edit call; evaluate all B·T cases
  after the stream, restore.
* lifelong(N, B, checkpoints): one stream of N cases in calls of B (AlphaEdit's protocol); after each
  checkpoint (a number of edits made so far) score every case edited so far; restore only at the end.
  Each row carries its ``checkpoint``.

A kind's logic is a function from the cases to ``Stream``s (``register_streams``, or the declaration's own
``streams``); ``run_scenario`` runs any of them the same way.  After every stream the model's logits on a
fixed probe batch must equal the unedited model's bit for bit; anything else is a bug in the method's
``restore`` and stops the run.

With ``downstream`` (kinds that allow it), a downstream check such as PIQA is scored on the edited model
after each stream, before restore, and once on the unedited model (the paper's Table 8); a stream with
checkpoints scores it at each checkpoint (the stream's value is the last one; every checkpoint's value goes
to the stream's artifact, ``downstream_checkpoints``).

Every case is scored under each of the cell's protocols (``benchmarks.protocols``: teacher-forced by
default; GRACE adds EasyEdit's generation protocol), giving one ``CaseResult`` per case and protocol.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from benchmarks.case import EditCase
from benchmarks.evaluate import CaseScores, PreEdit, compute_pre_edit, score_cases, with_protocols
from benchmarks.metrics import encode, model_logits
from benchmarks.protocols import cell_protocols, get_protocol
from benchmarks.registry import ExtraScorer, get_downstream
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel
from kebench.core.scenarios import SHAPE_PARAMS, ScenarioKind, get_scenario_kind, scenario_kinds
from methods.base import Editor, NonFiniteError, RestoreError, get_method

#: rows per scoring batch when K cases are scored together: the full-vocabulary logits of a batch dominate
#: a small model's scoring memory (SmolLM2: 4 rows x 40 tokens x 49,152 x 4 bytes = 31 MB), and with refill the
#: scoring runs while the other cases' training batch is alive.  Measured before ``release_freed_memory`` between
#: the phases, BaFT, 20 cases at K = 20: peak RSS 1526 MB with 8 rows, 1480 MB with 4, in the same wall time
#: (22.6 s, 22.9 s); with 16 rows K = 10 peaked at 1545 MB
GROUPED_EVAL_ROWS = 4
PROBE_TEXTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "nq question: who wrote the novel pride and prejudice",
    "The quick brown fox jumps over the",
    "In 1969, the first person to walk on the moon was",
)
#: the scenario keys every kind takes besides its own parameters
COMMON_KEYS = ("kind", *SHAPE_PARAMS, "downstream", "downstream_n", "parallel_cases")


@dataclass(frozen=True)
class Scenario:
    """A scenario kind with its parameters: what a cell's cases go through.

    ``T`` and ``B`` are every kind's stream shape (store columns; 1 unless the kind sets them); ``params``
    holds the kind's own parameters as sorted (name, value) pairs with the defaults filled in.
    """

    kind: str
    T: int = 1
    B: int = 1
    #: a downstream check (``benchmarks.registry.register_downstream``, e.g. "piqa") scored on the edited
    #: model after every stream, before restore, and once on the unedited model (paper Table 8)
    downstream: str | None = None
    downstream_n: int | None = None  # items of the downstream check (None: all)
    #: single editing only: keep up to K independent cases training at once in one batch, each with its own
    #: editor, where the method supports it (``Editor.edit_in_parallel``).  Each case trains exactly as alone
    #: (tests/test_parallel_equivalence.py, in float64), but a batch rounds differently from a single case and
    #: training can amplify the last bit, so K > 1 is part of the cell id for such methods (``Cell.identity``)
    parallel_cases: int = 1
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        kind = get_scenario_kind(self.kind)
        for name in SHAPE_PARAMS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise KebenchError(f"scenario {self.kind}: {name} must be a positive integer, got {value}")
        fixed = [name for name in SHAPE_PARAMS if name not in kind.sets and getattr(self, name) != 1]
        if fixed:
            note = kind.fixed_note or f"sets {' and '.join(kind.sets) or 'neither T nor B'}: {fixed[0]} must be 1"
            raise KebenchError(f"scenario {self.kind} {note}")
        object.__setattr__(self, "params", _kind_params(kind, dict(self.params), self.T, self.B))
        if self.downstream is not None:
            get_downstream(self.downstream)
            if not kind.downstream:
                allowed = _either(k.name for k in scenario_kinds() if k.downstream)
                raise KebenchError(f"downstream '{self.downstream}' is scored after a stream of edits: "
                                   f"use a {allowed} scenario")
        if isinstance(self.parallel_cases, bool) or not isinstance(self.parallel_cases, int) or self.parallel_cases < 1:
            raise KebenchError(f"scenario {self.kind}: parallel_cases must be a positive integer, got {self.parallel_cases!r}")
        if self.parallel_cases > 1 and not kind.parallel_cases:
            allowed = _either(k.name for k in scenario_kinds() if k.parallel_cases)
            raise KebenchError(f"scenario {self.kind}: parallel_cases is a setting of the {allowed} scenario "
                               "(a stream of several edits edits one model in order)")
        if self.downstream_n is not None and (self.downstream is None or self.downstream_n <= 0):
            raise KebenchError("downstream_n must be a positive integer and needs downstream")

    @property
    def declaration(self) -> ScenarioKind:
        return get_scenario_kind(self.kind)

    def param(self, name: str) -> Any:
        """The value of one of the kind's own parameters."""
        values = dict(self.params)
        if name not in values:
            self.declaration.param(name)  # raises, naming what the kind takes
        return values[name]

    @property
    def cases_per_stream(self) -> int:
        return self.declaration.cases_per_stream(self.T, self.B, dict(self.params))

    def scorings(self, n: int) -> int:
        """Case scorings a cell of ``n`` cases makes (n, or more where a stream is scored at several checkpoints):
        what ``kebench plan`` prices the evaluation by."""
        return n // self.cases_per_stream * self.declaration.scorings_per_stream(self.T, self.B, dict(self.params))

    def check_method(self, method: str) -> None:
        """A one-line error where ``method`` cannot run this scenario: B > 1 in a kind that needs joint edit calls
        (``ScenarioKind.joint_calls``) for a method that applies a call's cases one after another."""
        if self.B > 1 and self.declaration.joint_calls and not get_method(method).batch_edits:
            raise KebenchError(f"{method} cannot take B={self.B} in {self.label}: it applies a call's cases one "
                               "after another, so this would be B=1 under another label; use B: 1")

    @property
    def label(self) -> str:
        base = self.declaration.format(self.declaration.label, self.T, self.B, dict(self.params))
        if self.downstream is None:
            return base
        return f"{base}+{self.downstream}(n={'all' if self.downstream_n is None else self.downstream_n})"

    def identity(self) -> dict:
        """What a cell id hashes: the kind, T, B and the kind's own parameters; the downstream keys only when
        set, so ids of older cells do not change."""
        out: dict = {"kind": self.kind, "T": self.T, "B": self.B}
        out.update((name, list(value) if isinstance(value, tuple) else value) for name, value in self.params)
        if self.downstream is not None:
            out.update(downstream=self.downstream, downstream_n=self.downstream_n)
        return out


def _either(names: Any) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _kind_params(kind: ScenarioKind, given: Mapping[str, Any], T: int, B: int) -> tuple[tuple[str, Any], ...]:
    """The kind's own parameters, checked (each alone, then across them: ``ScenarioKind.normalize``), with
    defaults filled in, sorted by name."""
    unknown = sorted(set(given) - {param.name for param in kind.params})
    if unknown:
        kind.param(unknown[0])  # raises, naming what the kind takes
    values = {}
    for param in kind.params:
        value = given.get(param.name, param.default)
        if value is None:
            raise KebenchError(f"scenario {kind.name}: missing required parameter '{param.name}'")
        values[param.name] = param.check(value, kind.name)
    if kind.normalize is not None:
        values = {name: (tuple(value) if isinstance(value, list) else value)
                  for name, value in kind.normalize({"T": T, "B": B, **values}).items() if name not in SHAPE_PARAMS}
    return tuple(sorted(values.items()))


# --------------------------------------------------------------------------- stream logic

@dataclass(frozen=True)
class Stream:
    """Edit calls applied in order to one editor, then scored, then restored.

    ``calls``: each call is a list of cases edited by one ``Editor.apply``.  ``checkpoints``: after how many
    calls every case edited so far is scored (empty: once, after the last call).  Scoring a stream more than
    once gives a case several rows per metric, which the store needs a column to tell apart.
    """

    calls: tuple[tuple[EditCase, ...], ...]
    checkpoints: tuple[int, ...] = ()

    @property
    def cases(self) -> list[EditCase]:
        """The stream's cases, each once, in the order they are first edited (a case edited twice is scored once)."""
        return list({case.case_id: case for call in self.calls for case in call}.values())

    def scored_after(self) -> tuple[int, ...]:
        return self.checkpoints or (len(self.calls),)


StreamsFn = Callable[[Sequence[EditCase], Scenario], list[Stream]]
_STREAMS: dict[str, StreamsFn] = {}


def register_streams(kind: str) -> Callable[[StreamsFn], StreamsFn]:
    """Register the stream logic of a declared scenario kind (``kebench.core.scenarios``)."""
    def decorate(fn: StreamsFn) -> StreamsFn:
        if kind in _STREAMS and _STREAMS[kind] is not fn:
            raise ValueError(f"stream logic for scenario {kind!r} registered twice")
        _STREAMS[kind] = fn
        return fn

    return decorate


def make_streams(cases: Sequence[EditCase], scenario: Scenario) -> list[Stream]:
    """The streams of edit calls ``scenario`` makes of ``cases`` (a one-line error when they do not fit)."""
    kind = scenario.declaration
    logic = kind.streams or _STREAMS.get(kind.name)
    if logic is None:
        raise KebenchError(f"scenario {kind.name} has no stream logic: give its declaration streams= or "
                           "register one with orchestrator.scenarios.register_streams")
    size = scenario.cases_per_stream
    if len(cases) % size:
        raise KebenchError(
            f"{len(cases)} cases do not split into streams of {size} for {scenario.label}; choose n as a multiple of {size}"
        )
    return logic(cases, scenario)


def chunked_streams(cases: Sequence[EditCase], size: int, call_size: int) -> list[Stream]:
    """Streams of ``size`` consecutive cases, each edited in calls of ``call_size``."""
    streams = []
    for start in range(0, len(cases), size):
        chunk = tuple(cases[start : start + size])
        streams.append(Stream(tuple(chunk[i : i + call_size] for i in range(0, size, call_size))))
    return streams


@register_streams("single")
@register_streams("continual")
@register_streams("batched")
def _fixed_shape_streams(cases: Sequence[EditCase], scenario: Scenario) -> list[Stream]:
    """single, continual(T), batched(B, T): streams of T calls of B cases (single: T = B = 1)."""
    return chunked_streams(cases, scenario.T * scenario.B, scenario.B)


@register_streams("lifelong")
def _lifelong_streams(cases: Sequence[EditCase], scenario: Scenario) -> list[Stream]:
    """lifelong(N, B, checkpoints): streams of N cases in calls of B, scored after each checkpoint's call (a cell
    of n = k·N cases runs k such streams, each restored at its end)."""
    calls_at = tuple(checkpoint // scenario.B for checkpoint in scenario.param("checkpoints"))
    return [Stream(stream.calls, calls_at) for stream in chunked_streams(cases, scenario.param("N"), scenario.B)]


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    stream: int
    scores: CaseScores
    seconds: float  # wall time of the edit call that edited this case
    steps: int
    #: edits made in the stream when these scores were taken, for a stream scored at checkpoints (lifelong);
    #: None where a stream is scored once
    checkpoint: int | None = None


@dataclass(frozen=True)
class DownstreamResult:
    """A downstream check on the unedited model and on the edited model after each stream."""

    name: str
    items: int
    unedited: float
    edited: tuple[float, ...]  # one value per stream (a stream with checkpoints: at its last one)
    #: (checkpoint, mean over streams) for streams scored at checkpoints (lifelong); () otherwise
    checkpoints: tuple[tuple[int, float], ...] = ()

    @property
    def edited_mean(self) -> float:
        return sum(self.edited) / len(self.edited)


@dataclass
class ScenarioResult:
    scenario: Scenario
    cases: list[CaseResult] = field(default_factory=list)
    edit_seconds: list[float] = field(default_factory=list)  # one entry per edit call
    trainable_parameters: int = 0
    paper_parameters: int | None = None  # the paper's Table 3 convention, where a method has one
    peak_rss_mb: float = 0.0
    downstream: DownstreamResult | None = None
    #: per stream, what ``Editor.artifacts`` returned after its edits (empty dicts are kept, one per stream)
    artifacts: list[dict] = field(default_factory=list)
    #: how the cases were run where it matters for reading the timings (case-parallel single editing)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds_per_edit(self) -> float:
        return sum(self.edit_seconds) / len(self.edit_seconds) if self.edit_seconds else 0.0


def plain_logits(lm: LoadedModel) -> Callable:
    return model_logits(lm.model)  # the unedited model; decodes with a KV cache


def _probe_logits(lm: LoadedModel) -> torch.Tensor:
    batch = encode(lm.tokenizer, [(text, "X") for text in PROBE_TEXTS], lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def check_finite_outputs(logits: Callable, lm: LoadedModel, what: str, editors: int = 0) -> None:
    """The edited model's outputs on the probe texts are finite, or ``NonFiniteError`` naming ``what``.

    Run after every edit call: an ``apply`` that leaves NaN or inf in the model (a plug-in's, or a diverged
    update a method did not check) would otherwise score 0.00 everywhere and be stored as ``ok``.
    ``editors``: a case-parallel group's editor count (one probe row routed through each)."""
    if editors:
        texts = [PROBE_TEXTS[index % len(PROBE_TEXTS)] for index in range(editors)]
        batch = encode(lm.tokenizer, [(text, "X") for text in texts], lm.pad_token_id, groups=range(editors))
    else:
        batch = encode(lm.tokenizer, [(text, "X") for text in PROBE_TEXTS], lm.pad_token_id)
    with torch.no_grad():
        values = logits(batch.to(lm.device))
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"{what}: the edited model's outputs are not finite (NaN or inf) on the probe texts")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)  # glibc only (not macOS or musl)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``, as Dask's workers do).

    Between phases of a cell (training a batch, scoring it) glibc keeps what a phase freed: a training batch's
    activations are many mid-sized blocks that it serves from its heap rather than from mmap, so the next
    phase's allocations land on top of them and the process's resident memory is the sum of both phases'
    peaks instead of the larger one.  A no-op where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def run_scenario(
    lm: LoadedModel,
    method: str,
    hparams,
    cases: Sequence[EditCase],
    scenario: Scenario,
    seed: int,
    metrics: Sequence[str] = ("rel", "gen", "loc", "por"),
    pre: PreEdit | None = None,
    on_edit: Callable[[int], None] | None = None,
    verify_restore: bool = True,
    data_dir: str | None = None,
    downstream_unedited: float | None = None,
    extra_scorer: ExtraScorer | None = None,
    protocols: Sequence[str] | None = None,
    on_stream: Callable[[int, "ScenarioResult"], None] | None = None,
) -> ScenarioResult:
    """Run every stream of ``scenario`` over ``cases``; ``on_edit(n)`` is called after each edit call and
    ``on_stream(index, result so far)`` after each stream (a sweep reports running scores to Tune there).

    ``protocols``: what the cases are scored under (None: the default set, ``benchmarks.protocols``);
    the method's ``Editor.required_protocols`` are always added.
    ``downstream_unedited``: the unedited model's downstream score when the caller has it cached.
    ``extra_scorer``: the benchmark's own metrics (``Benchmark.extra_scorer``), scored under their own
    protocol: references on the unedited model before each stream, scores after its edits.
    """
    editor_class = get_method(method)
    scenario.check_method(method)
    protocols = cell_protocols(protocols, editor_class.required_protocols)
    streams = make_streams(cases, scenario)
    if pre is None:
        pre = compute_pre_edit(plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, cases, protocols=protocols)
    else:  # a cached PreEdit may lack the references of a protocol this cell adds (GRACE's generation)
        pre = with_protocols(pre, plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, cases, protocols)
    reference = _probe_logits(lm) if verify_restore else None
    result = ScenarioResult(scenario)
    # every setting a protocol's numbers depend on (the wild context, decoding) goes into the provenance
    result.notes += [note for p in protocols if (note := get_protocol(p).describe(editor_class.logits))]
    check = None
    if scenario.downstream is not None:
        check = get_downstream(scenario.downstream)
        if downstream_unedited is None:
            downstream_unedited, _ = check.score(plain_logits(lm), lm, scenario.downstream_n, data_dir)
    downstream_edited: list[float] = []
    downstream_at: dict[int, list[float]] = {}  # checkpoint -> one value per stream
    downstream_items = 0
    if scenario.parallel_cases > 1:
        if all(get_protocol(p).groups_supported for p in protocols) and _run_case_parallel(
                lm, editor_class, hparams, streams, scenario.parallel_cases, seed, metrics, pre, on_edit, reference,
                extra_scorer, result, protocols):
            result.peak_rss_mb = peak_rss_mb()
            return result
        result.notes.append(f"parallel_cases={scenario.parallel_cases} not used: {method} has no case-parallel "
                            "path (for this model and precision); cases edited one by one")
    for stream_index, stream in enumerate(streams):
        stream_cases = stream.cases
        extra_state = extra_scorer.before(plain_logits(lm), lm, stream_cases) if extra_scorer is not None else None
        torch.manual_seed(seed)
        editor: Editor = editor_class(lm, hparams, seed)
        scores: list[tuple[int | None, CaseScores]] = []  # (checkpoint, scores)
        stream_downstream: dict[str, float] = {}
        try:
            timings: dict[str, tuple[float, int]] = {}
            edited: dict[str, EditCase] = {}  # each case once, in the order first edited
            checkpoints = set(stream.scored_after())
            for done, call in enumerate(stream.calls, start=1):
                started = time.perf_counter()
                stats = editor.apply(list(call))
                elapsed = time.perf_counter() - started
                check_finite_outputs(editor.logits, lm, f"{method}: after edit call {done} of stream {stream_index}")
                result.edit_seconds.append(elapsed)
                edited.update((case.case_id, case) for case in call if case.case_id not in edited)
                for case in call:
                    timings[case.case_id] = (elapsed, stats.steps)
                if on_edit is not None:
                    on_edit(len(call))
                if done in checkpoints:
                    release_freed_memory()
                    checkpoint = len(edited) if stream.checkpoints else None
                    scores += [(checkpoint, score) for score in
                               _score(editor, lm, list(edited.values()), pre, metrics, protocols, extra_scorer,
                                      extra_state)]
                    if check is not None and checkpoint is not None and done < len(stream.calls):
                        value, downstream_items = check.score(editor.logits, lm, scenario.downstream_n, data_dir)
                        stream_downstream[str(checkpoint)] = value
            result.trainable_parameters = max(result.trainable_parameters, editor.trainable_parameters())
            result.paper_parameters = editor.paper_parameters()
            artifact = dict(editor.artifacts(stream_cases))
            if check is not None:
                value, downstream_items = check.score(editor.logits, lm, scenario.downstream_n, data_dir)
                downstream_edited.append(value)
                if stream.checkpoints:
                    stream_downstream[str(len(edited))] = value
                    artifact["downstream_checkpoints"] = stream_downstream
                    for at, score in stream_downstream.items():
                        downstream_at.setdefault(int(at), []).append(score)
            result.artifacts.append(artifact)
        finally:
            editor.restore()
        if reference is not None and not torch.equal(_probe_logits(lm), reference):
            raise RestoreError(f"{method}: restore() did not return the model to its original outputs (stream {stream_index})")
        for checkpoint, score in scores:
            seconds, steps = timings[score.case_id]
            result.cases.append(CaseResult(score.case_id, stream_index, score, seconds, steps, checkpoint))
        if on_stream is not None:
            on_stream(stream_index, result)
    if check is not None:
        result.downstream = DownstreamResult(check.name, downstream_items, float(downstream_unedited),
                                             tuple(downstream_edited),
                                             tuple((at, sum(v) / len(v)) for at, v in sorted(downstream_at.items())))
    result.peak_rss_mb = peak_rss_mb()
    return result


def _score(editor: Editor, lm: LoadedModel, cases: Sequence[EditCase], pre: PreEdit, metrics: Sequence[str],
           protocols: Sequence[str], extra_scorer: ExtraScorer | None, extra_state: Any) -> list[CaseScores]:
    """The edited model's scores of ``cases`` under every protocol, then the benchmark's own (ConvSent's ES/DD)."""
    scores = [score for protocol in protocols
              for score in score_cases(editor.logits, lm.tokenizer, lm.pad_token_id, lm.device, cases, pre, metrics,
                                       protocol=protocol)]
    if extra_scorer is not None:
        extra = extra_scorer.after(editor.logits, lm, cases, extra_state)
        scores += [CaseScores(case.case_id, tuple(sorted(extra[case.case_id].items())), extra_scorer.protocol)
                   for case in cases]
    return scores


def _run_case_parallel(lm: LoadedModel, editor_class: type[Editor], hparams, streams: list[Stream],
                       parallel: int, seed: int, metrics: Sequence[str], pre: PreEdit,
                       on_edit: Callable[[int], None] | None, reference: torch.Tensor | None,
                       extra_scorer: ExtraScorer | None, result: ScenarioResult,
                       protocols: Sequence[str] = ("teacher_forced",)) -> bool:
    """Single editing, ``parallel`` independent cases training at once (``Editor.edit_in_parallel``); each case
    is a stream of its own, as in the one-by-one run, and gets the same result.  A case's ``seconds`` is its
    share of the training time.  False, having done nothing, where the method has no case-parallel path."""
    cases = [stream.calls[0][0] for stream in streams]
    edited = editor_class.edit_in_parallel(lm, hparams, seed, cases, parallel)
    if edited is None:
        return False
    result.notes.append(f"parallel_cases={parallel}: single edits trained {parallel} at a time in one batch, "
                        "each with its own editor; s/edit is the training time / cases")
    extra_state = extra_scorer.before(plain_logits(lm), lm, cases) if extra_scorer is not None else None
    position = {case.case_id: index for index, case in enumerate(cases)}
    release_freed_memory()  # the pre-edit scoring's batches, before the training batch is allocated
    rows: dict[int, list[CaseResult]] = {}
    artifacts: dict[int, dict] = {}
    try:
        for done in edited:
            group = done.group
            share = done.seconds / len(done.cases)
            check_finite_outputs(group.logits, lm, f"{editor_class.name}: after the edits of cases "
                                 f"{', '.join(case.case_id for case in done.cases)}", editors=len(done.cases))
            result.edit_seconds.extend([share] * len(done.cases))
            if on_edit is not None:
                on_edit(len(done.cases))
            release_freed_memory()  # the training batch's activations, before scoring allocates its own
            try:
                scores = [score for protocol in protocols
                          for score in score_cases(group.logits, lm.tokenizer, lm.pad_token_id, lm.device, done.cases,
                                                   pre, metrics, batch_size=GROUPED_EVAL_ROWS, protocol=protocol,
                                                   grouped=True)]
                if extra_scorer is not None:
                    for editor, case in zip(group.editors, done.cases):
                        extra = extra_scorer.after(editor.logits, lm, [case], extra_state)
                        scores.append(CaseScores(case.case_id, tuple(sorted(extra[case.case_id].items())),
                                                 extra_scorer.protocol))
                editors = list(group.editors)
                result.trainable_parameters = max(result.trainable_parameters, editors[0].trainable_parameters())
                result.paper_parameters = editors[0].paper_parameters()
                for editor, case in zip(editors, done.cases):
                    artifacts[position[case.case_id]] = editor.artifacts([case])
            finally:
                group.restore()
            if reference is not None and not torch.equal(_probe_logits(lm), reference):
                raise RestoreError(f"{editor_class.name}: restore() did not return the model to its original outputs "
                                   f"(cases {', '.join(case.case_id for case in done.cases)})")
            steps = {case.case_id: stats.steps for case, stats in zip(done.cases, done.stats)}
            for score in scores:
                index = position[score.case_id]
                rows.setdefault(index, []).append(CaseResult(score.case_id, index, score, share, steps[score.case_id]))
    finally:
        close = getattr(edited, "close", None)  # a generator restores whatever was still training
        if close is not None:
            close()
    for index in sorted(rows):  # the one-by-one order, whatever order the cases finished in
        result.cases.extend(rows[index])
    result.artifacts.extend(artifacts[index] for index in sorted(artifacts))
    return True
