"""Editing scenarios: single, continual(T) and batched(B, T), per the WISE/BaFT protocol.

* single: edit one case, evaluate it, restore.
* continual(T): streams of T cases; apply the T edits one after another with one editor, then evaluate
  all T cases (locality against the unedited model), restore, next stream.
* batched(B, T): streams of T batches of B cases; each batch is one edit call; evaluate all B·T cases
  after the stream, restore.

After every stream the model's logits on a fixed probe batch must equal the unedited model's bit for
bit; anything else is a bug in the method's ``restore`` and stops the run.

With ``downstream`` (continual and batched), a downstream check such as PIQA is scored on the edited
model after each stream, before restore, and once on the unedited model (the paper's Table 8).

Every case is scored under each protocol in the editor's ``protocols`` (teacher-forced for all; GRACE
adds EasyEdit's generation protocol), giving one ``CaseResult`` per case and protocol, each tagged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from benchmarks.case import EditCase
from benchmarks.evaluate import CaseScores, PreEdit, check_protocols, compute_pre_edit, score_cases, with_protocols
from benchmarks.metrics import encode
from benchmarks.registry import ExtraScorer
from methods.base import Editor, get_method
from kebench.core.errors import KebenchError
from kebench.core.models import LoadedModel

SCENARIO_KINDS = ("single", "continual", "batched")
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


@dataclass(frozen=True)
class Scenario:
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

    def __post_init__(self) -> None:
        if self.kind not in SCENARIO_KINDS:
            raise KebenchError(f"unknown scenario '{self.kind}'; known: {', '.join(SCENARIO_KINDS)}")
        if self.T <= 0:
            raise KebenchError(f"scenario {self.kind}: T must be a positive integer, got {self.T}")
        if self.B <= 0:
            raise KebenchError(f"scenario {self.kind}: B must be a positive integer, got {self.B}")
        if self.kind == "single" and (self.T != 1 or self.B != 1):
            raise KebenchError("scenario single edits one case at a time: T and B must be 1")
        if self.kind == "continual" and self.B != 1:
            raise KebenchError("scenario continual edits one case per call: B must be 1 (use batched)")
        if self.downstream is not None:
            from benchmarks.registry import get_downstream

            get_downstream(self.downstream)
            if self.kind == "single":
                raise KebenchError(f"downstream '{self.downstream}' is scored after a stream of edits: "
                                   "use a continual or batched scenario")
        if isinstance(self.parallel_cases, bool) or not isinstance(self.parallel_cases, int) or self.parallel_cases < 1:
            raise KebenchError(f"scenario {self.kind}: parallel_cases must be a positive integer, got {self.parallel_cases!r}")
        if self.parallel_cases > 1 and self.kind != "single":
            raise KebenchError(f"scenario {self.kind}: parallel_cases is a setting of the single scenario "
                               "(a continual or batched stream edits one model in order)")
        if self.downstream_n is not None and (self.downstream is None or self.downstream_n <= 0):
            raise KebenchError("downstream_n must be a positive integer and needs downstream")

    @property
    def cases_per_stream(self) -> int:
        return self.T * self.B

    @property
    def label(self) -> str:
        if self.kind == "single":
            base = "single"
        elif self.kind == "continual":
            base = f"continual(T={self.T})"
        else:
            base = f"batched(B={self.B},T={self.T})"
        if self.downstream is None:
            return base
        return f"{base}+{self.downstream}(n={'all' if self.downstream_n is None else self.downstream_n})"

    def identity(self) -> dict:
        """What a cell id hashes; the downstream keys only when set, so ids of older cells do not change."""
        out: dict = {"kind": self.kind, "T": self.T, "B": self.B}
        if self.downstream is not None:
            out.update(downstream=self.downstream, downstream_n=self.downstream_n)
        return out


def make_streams(cases: Sequence[EditCase], scenario: Scenario) -> list[list[list[EditCase]]]:
    """Streams of edit calls: each stream is a list of calls, each call a list of cases."""
    size = scenario.cases_per_stream
    if len(cases) % size:
        raise KebenchError(
            f"{len(cases)} cases do not split into streams of {size} for {scenario.label}; choose n as a multiple of {size}"
        )
    streams = []
    for start in range(0, len(cases), size):
        chunk = list(cases[start : start + size])
        streams.append([chunk[i : i + scenario.B] for i in range(0, size, scenario.B)])
    return streams


@dataclass(frozen=True)
class CaseResult:
    case_id: str
    stream: int
    scores: CaseScores
    seconds: float  # wall time of the edit call that edited this case
    steps: int


@dataclass(frozen=True)
class DownstreamResult:
    """A downstream check on the unedited model and on the edited model after each stream."""

    name: str
    items: int
    unedited: float
    edited: tuple[float, ...]  # one value per stream

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
    return lambda batch: lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _probe_logits(lm: LoadedModel) -> torch.Tensor:
    batch = encode(lm.tokenizer, [(text, "X") for text in PROBE_TEXTS], lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


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
) -> ScenarioResult:
    """Run every stream of ``scenario`` over ``cases``; ``on_edit(n)`` is called after each edit call.

    ``downstream_unedited``: the unedited model's downstream score when the caller has it cached.
    ``extra_scorer``: the benchmark's own metrics (``Benchmark.extra_scorer``), scored under their own
    protocol: references on the unedited model before each stream, scores after its edits.
    """
    editor_class = get_method(method)
    protocols = tuple(editor_class.protocols)
    check_protocols(protocols)
    streams = make_streams(cases, scenario)
    if pre is None:
        pre = compute_pre_edit(plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, cases, protocols=protocols)
    else:  # a cached teacher-forced PreEdit lacks the generation protocol's references
        pre = with_protocols(pre, plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device, cases, protocols)
    reference = _probe_logits(lm) if verify_restore else None
    check = None
    if scenario.downstream is not None:
        from benchmarks.registry import get_downstream

        check = get_downstream(scenario.downstream)
        if downstream_unedited is None:
            downstream_unedited, _ = check.score(plain_logits(lm), lm, scenario.downstream_n, data_dir)
    downstream_edited: list[float] = []
    downstream_items = 0
    result = ScenarioResult(scenario)
    if scenario.parallel_cases > 1:
        if protocols == ("teacher_forced",) and _run_case_parallel(
                lm, editor_class, hparams, streams, scenario.parallel_cases, seed, metrics, pre, on_edit, reference,
                extra_scorer, result):
            result.peak_rss_mb = peak_rss_mb()
            return result
        result.notes.append(f"parallel_cases={scenario.parallel_cases} not used: {method} has no case-parallel "
                            "path (for this model and precision); cases edited one by one")
    for stream_index, stream in enumerate(streams):
        stream_cases = [case for call in stream for case in call]
        extra_state = extra_scorer.before(plain_logits(lm), lm, stream_cases) if extra_scorer is not None else None
        torch.manual_seed(seed)
        editor: Editor = editor_class(lm, hparams, seed)
        try:
            timings: dict[str, tuple[float, int]] = {}
            for call in stream:
                started = time.perf_counter()
                stats = editor.apply(call)
                elapsed = time.perf_counter() - started
                result.edit_seconds.append(elapsed)
                for case in call:
                    timings[case.case_id] = (elapsed, stats.steps)
                if on_edit is not None:
                    on_edit(len(call))
            release_freed_memory()
            scores = [score for protocol in protocols
                      for score in score_cases(editor.logits, lm.tokenizer, lm.pad_token_id, lm.device, stream_cases,
                                               pre, metrics, protocol=protocol)]
            if extra_scorer is not None:
                extra = extra_scorer.after(editor.logits, lm, stream_cases, extra_state)
                scores += [CaseScores(case.case_id, tuple(sorted(extra[case.case_id].items())), extra_scorer.protocol)
                           for case in stream_cases]
            result.trainable_parameters = max(result.trainable_parameters, editor.trainable_parameters())
            result.paper_parameters = editor.paper_parameters()
            result.artifacts.append(editor.artifacts(stream_cases))
            if check is not None:
                value, downstream_items = check.score(editor.logits, lm, scenario.downstream_n, data_dir)
                downstream_edited.append(value)
        finally:
            editor.restore()
        if reference is not None and not torch.equal(_probe_logits(lm), reference):
            raise RuntimeError(f"{method}: restore() did not return the model to its original outputs (stream {stream_index})")
        for score in scores:
            seconds, steps = timings[score.case_id]
            result.cases.append(CaseResult(score.case_id, stream_index, score, seconds, steps))
    if check is not None:
        result.downstream = DownstreamResult(check.name, downstream_items, float(downstream_unedited),
                                             tuple(downstream_edited))
    result.peak_rss_mb = peak_rss_mb()
    return result


def _run_case_parallel(lm: LoadedModel, editor_class: type[Editor], hparams, streams: list[list[list[EditCase]]],
                       parallel: int, seed: int, metrics: Sequence[str], pre: PreEdit,
                       on_edit: Callable[[int], None] | None, reference: torch.Tensor | None,
                       extra_scorer: ExtraScorer | None, result: ScenarioResult) -> bool:
    """Single editing, ``parallel`` independent cases training at once (``Editor.edit_in_parallel``); each case
    is a stream of its own, as in the one-by-one run, and gets the same result.  A case's ``seconds`` is its
    share of the training time.  False, having done nothing, where the method has no case-parallel path."""
    cases = [stream[0][0] for stream in streams]
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
            result.edit_seconds.extend([share] * len(done.cases))
            if on_edit is not None:
                on_edit(len(done.cases))
            release_freed_memory()  # the training batch's activations, before scoring allocates its own
            try:
                scores = score_cases(group.logits, lm.tokenizer, lm.pad_token_id, lm.device, done.cases, pre, metrics,
                                     batch_size=GROUPED_EVAL_ROWS, grouped=True)
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
                raise RuntimeError(f"{editor_class.name}: restore() did not return the model to its original outputs "
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
