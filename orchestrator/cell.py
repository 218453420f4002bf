"""One cell, whoever asks for it: a grid worker, a sweep trial or ``kebench edit``.

``run_cell`` takes a ``CellRequest`` (model, cases, method and hyperparameters, scenario, seed, precision,
protocols) and does the whole computation once: the model in the cell's precision (loaded once per
process, ``ModelCache``), the cases (checked against the hash the cell was expanded with), the unedited
model's references (cached per process), the scenario with the benchmark's own scorer, the case rows,
the drill-down artifact and the provenance notes.  The callers differ only in what they do around it:
the grid worker turns the result into a stored row (``execute_cell``), the sweep reports running scores
to Tune after each stream (``on_stream``), ``kebench edit`` prints a table.

Provenance is assembled here, once, from everything a number depends on beyond model, data and
hyperparameters: the model's revision, where the hyperparameters came from (file and hash), the case
selection's note, the method's own note (e.g. its statistics corpus) and the scenario's notes; beside them
the hardware record (``kebench.core.numerics.hardware_record``: CPU, the ISA torch dispatches to, BLAS and
oneDNN versions, MKL's branch, the numerics environment and thread counts, the GPU) and the numerics
setting the process runs under, which a request that names one must match (issue 30).
"""

from __future__ import annotations

import datetime as dt
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.data import resolve_data_dir
from benchmarks.evaluate import compute_pre_edit
from benchmarks.registry import get_benchmark, select_cases
from kebench.core.errors import KebenchError
from kebench.core.models import Precision, load_model, with_precision
from kebench.core.numerics import hardware_record, process_numerics, verify_numerics
from methods.base import NonFiniteError, get_method
from orchestrator.grid import Cell
from orchestrator.scenarios import Scenario, ScenarioResult, peak_rss_mb, plain_logits, run_scenario
from results import rows
from results.store import package_versions

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class CellRequest:
    """Everything that decides one cell's numbers, and where its inputs must come from.

    ``n`` None is the whole split.  ``data_sha256`` and ``model_revision`` are what a grid cell was expanded
    with: data or weights that changed since are an error ("" checks nothing).  ``protocols`` () is the
    method's default set.  ``hparams_source`` is provenance only.
    """

    model: str
    benchmark: str
    split: str
    n: int | None
    offset: int
    scenario: Scenario
    method: str
    hparams: Any
    seed: int
    precision: Precision = field(default_factory=Precision)
    hparams_source: str = ""
    protocols: tuple[str, ...] = ()
    data_sha256: str = ""
    model_revision: str = ""
    device: str | None = None  # None: the default device
    #: the numerics the cell's process must run under (``kebench.core.numerics``); "" checks nothing
    numerics: str = ""


def grid_request(cell: Cell) -> CellRequest:
    """A grid cell as a request: its hyperparameters rebuilt from the JSON its id hashes."""
    return CellRequest(cell.model, cell.benchmark, cell.split, cell.n, cell.offset, cell.scenario, cell.method,
                       cell.hparams_object(), cell.seed, cell.precision, cell.hparams_source, cell.protocols,
                       cell.data_sha256, cell.model_revision, numerics=cell.numerics)


@dataclass
class CellResult:
    """What one cell computed: ``case_rows`` in the store's long format (stored protocol tags), the cell-row
    ``fields`` it measured, its provenance ``notes``, the drill-down ``artifact``, and the scenario result
    itself (per-case timings, downstream scores) for callers that show more than the store keeps."""

    case_rows: list[dict[str, Any]]
    fields: dict[str, Any]
    notes: list[str]
    artifact: dict[str, Any]
    scenario: ScenarioResult
    cases: int
    data_sha256: str
    selection_note: str = ""

    @property
    def provenance(self) -> str:
        return "; ".join(self.notes)


class ModelCache:
    """The models and unedited-model outputs a process keeps between cells (a grid worker, a sweep actor)."""

    def __init__(self) -> None:
        self.models: dict[tuple, Any] = {}
        self.pre_edit: dict[tuple, Any] = {}
        self.downstream_unedited: dict[tuple, float] = {}  # (check, n) -> the unedited model's score
        self.loads = 0

    def model(self, name: str, precision: Precision | None = None, revision: str | None = None,
              device: str | None = None):
        """The model ``name`` in ``precision`` (None: float32), loaded once per process.

        ``revision``: what the cell was expanded with; weights that changed since (a moved branch, a
        rewritten folder, another wheel) are an error, as changed benchmark data is.
        """
        precision = precision or Precision()
        key = (name, precision.model, device)
        if key not in self.models:
            self.models.clear()  # one model per process at a time: 7B models do not fit twice
            self.pre_edit.clear()
            self.downstream_unedited.clear()
            self.models[key] = load_model(name, device=device, dtype=precision.torch_dtype)
            self.loads += 1
        lm = self.models[key]
        if revision and lm.info.revision != revision:
            raise KebenchError(f"model {name} changed since the grid was expanded: it is {lm.info.revision}, "
                               f"the cell was expanded with {revision}; expand the grid again")
        return with_precision(lm, precision)


def run_cell(req: CellRequest, cache: ModelCache, data_dir: str | None = None,
             on_stream: Callable[[int, CellResult], None] | None = None,
             on_edit: Callable[[int], None] | None = None) -> CellResult:
    """Compute one cell.  ``on_stream(index, the cell's result so far)`` after each stream (a sweep reports
    running scores to Tune there), ``on_edit(n)`` after each edit call.  Raises whatever the computation
    raises (the grid worker turns that into a failed row)."""
    if req.numerics:  # a process started under other numerics would store its numbers under this cell's id
        verify_numerics(req.numerics)
    lm = cache.model(req.model, req.precision, req.model_revision, req.device)
    selection = select_cases(req.benchmark, req.split, req.n, req.offset, data_dir)
    if req.data_sha256 and selection.data_sha256 != req.data_sha256:
        raise KebenchError(f"benchmark data changed since the grid was expanded ({req.benchmark}/{req.split})")
    key = (req.benchmark, req.split, req.offset, req.n)
    if key not in cache.pre_edit:
        cache.pre_edit[key] = compute_pre_edit(plain_logits(lm), lm.tokenizer, lm.pad_token_id, lm.device,
                                               selection.cases)
    bench = get_benchmark(req.benchmark)
    downstream_key = (req.scenario.downstream, req.scenario.downstream_n)

    def cell_result(result: ScenarioResult) -> CellResult:
        notes = _notes(req, lm, selection.provenance_note, result)
        fields: dict[str, Any] = {
            "seconds_per_edit": result.seconds_per_edit,
            "trainable_params": result.trainable_parameters,
            "paper_params": result.paper_parameters,
            "device": _device_label(lm),
            "dtype": req.precision.key,
            "hardware": hardware_record(),
            "numerics": process_numerics(),
            "notes": notes,
        }
        if result.downstream is not None:
            fields.update(downstream=result.downstream.name, downstream_items=result.downstream.items,
                          downstream_unedited=result.downstream.unedited,
                          downstream_edited=result.downstream.edited_mean)
        return CellResult(
            case_rows=rows.case_rows(result.cases, bench.row_protocol),
            fields=fields,
            notes=notes,
            artifact=rows.cell_artifact(selection.cases, result.cases, result.artifacts, bench.row_protocol),
            scenario=result,
            cases=len(selection.cases),
            data_sha256=selection.data_sha256,
            selection_note=selection.provenance_note or "",
        )

    def stream_done(index: int, so_far: ScenarioResult) -> None:
        if on_stream is not None:
            on_stream(index, cell_result(so_far))

    result = run_scenario(lm, req.method, req.hparams, selection.cases, req.scenario, req.seed, bench.metrics,
                          pre=cache.pre_edit[key], on_edit=on_edit, data_dir=data_dir,
                          downstream_unedited=cache.downstream_unedited.get(downstream_key),
                          extra_scorer=bench.extra_scorer(req.split, resolve_data_dir(data_dir)),
                          protocols=req.protocols or None, on_stream=stream_done)
    if result.downstream is not None:
        cache.downstream_unedited[downstream_key] = result.downstream.unedited
    return cell_result(result)


def _notes(req: CellRequest, lm: Any, selection_note: str, result: ScenarioResult) -> list[str]:
    notes = [f"model {lm.info.revision}"]
    if req.hparams_source:
        notes.append(req.hparams_source)
    if selection_note:
        notes.append(selection_note)
    method_note = get_method(req.method).provenance(req.hparams)  # e.g. the corpus of ROME/MEMIT statistics
    if method_note:
        notes.append(method_note)
    notes.extend(result.notes)  # the thread count and the rest of the floating-point path: fields["hardware"]
    return notes


# --------------------------------------------------------------------------- a cell as a stored attempt

@dataclass(frozen=True)
class CellOutcome:
    cell_row: dict[str, Any]
    case_rows: list[dict[str, Any]]
    worker_pid: int
    model_loads: int
    compute_seconds: float
    artifact: dict[str, Any] | None = None  # drill-down details and editor artifacts (JSON), ok cells only


def execute_cell(cell: Cell, attempt: int, cache: ModelCache, data_dir: str | None = None) -> CellOutcome:
    """Run one grid cell and return its rows; an exception becomes a ``failed`` row, never a raise."""
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.perf_counter()
    _reset_peak_rss()
    measured: dict[str, Any] = {"packages": package_versions()}
    case_rows: list[dict[str, Any]] = []
    artifact: dict[str, Any] | None = None
    provenance, status, error = "", OK, None
    try:
        result = run_cell(grid_request(cell), cache, data_dir)
        case_rows, artifact, provenance = result.case_rows, result.artifact, result.provenance
        measured.update(result.fields)
    except NonFiniteError as exc:
        status, error = FAILED, f"non-finite: {exc}"
    except Exception as exc:  # a failing cell must not stop the grid
        status, error = FAILED, failure_text(exc)
        if is_out_of_memory(exc):
            error = f"out of memory: {error}"
            _release_accelerator_memory()  # the next cell on this worker starts from a clean allocator
    measured.update(peak_rss_mb=_peak_rss_mb(), started_at=started, finished_at=dt.datetime.now(dt.timezone.utc))
    row = rows.cell_row(cell.row_key(), attempt=attempt, status=status, error=error, fields=measured,
                        provenance=provenance)
    return CellOutcome(row, case_rows, os.getpid(), cache.loads, time.perf_counter() - clock, artifact)


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed inside the cell: Python's ``MemoryError``, a CUDA (or other device)
    ``torch.OutOfMemoryError``, torch's CPU allocator giving up, or Ray's memory-monitor error raised in the
    cell's own process.  (A worker the memory monitor kills never gets here: ``orchestrator.supervisor``.)"""
    import torch  # imported by the cell already; not at module import, which must leave the numerics unset

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text
                                              or "CUDA out of memory" in text)


def _release_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def failure_text(exc: BaseException) -> str:
    """An exception as a failed row's error: its type, first line, and where it was raised."""
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" ({Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{where}"


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark so each cell reports its own peak (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def _device_label(lm: Any) -> str:
    """The device the cell ran on, plus the GPU ids Ray granted (bookkeeping on a CPU-only machine)."""
    label = str(lm.device)
    try:
        import ray  # only where a cell runs inside Ray; `kebench edit` never imports it

        if ray.is_initialized():
            gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
            if gpus:
                label += f" (ray GPU ids {','.join(map(str, gpus))})"
    except Exception:  # outside a Ray task
        pass
    return label
