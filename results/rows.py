"""The one place result rows are built: grid cells, sweep trials and ``kebench edit`` all call these.

Rows are plain dicts in the store's long format (one per case × metric; ``results.store`` validates
them); ``per_case`` pivots them back to one mapping per case for JSON lines and summaries.  This
module sees scenario results only through the small protocols below, so the results layer keeps
depending on nothing but the base layer.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence


class _Scores(Protocol):
    case_id: str
    protocol: str
    details: tuple[tuple[str, str], ...]

    def as_dict(self) -> Mapping[str, float]: ...


class _CaseResult(Protocol):
    case_id: str
    stream: int
    scores: _Scores
    seconds: float
    steps: int
    checkpoint: int | None  # edits made in the stream when scored (lifelong); None: scored once


class _Case(Protocol):
    case_id: str
    prompt: str
    target_new: str
    rephrase: tuple[str, ...]


def case_rows(results: Iterable[_CaseResult], row_protocol: Callable[[str], str] = lambda p: p) -> list[dict[str, Any]]:
    """One row per case × metric (× checkpoint); ``row_protocol`` maps the scored protocol to the stored tag
    (ConvSent's proxy)."""
    return [
        {"stream": r.stream, "case_id": r.case_id, "metric": metric, "value": float(value),
         "protocol": row_protocol(r.scores.protocol), "checkpoint": getattr(r, "checkpoint", None)}
        for r in results
        for metric, value in r.scores.as_dict().items()
        if value is not None
    ]


def per_case(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Long rows → one dict per (case, stream, protocol, checkpoint) with a key per metric, in first-seen order
    (``checkpoint`` only where the rows have one)."""
    out: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        checkpoint = row.get("checkpoint")
        key = (row["case_id"], row["stream"], row["protocol"], checkpoint)
        entry = out.setdefault(key, {"case_id": row["case_id"], "stream": row["stream"], "protocol": row["protocol"],
                                     **({} if checkpoint is None else {"checkpoint": checkpoint})})
        entry[row["metric"]] = row["value"]
    return list(out.values())


def cell_artifact(cases: Sequence[_Case], results: Iterable[_CaseResult], streams: Sequence[Mapping[str, Any]],
                  row_protocol: Callable[[str], str] = lambda p: p) -> dict[str, Any]:
    """The per-cell JSON artifact: each case's prompt, target and drill-down details per protocol (a case scored
    at several checkpoints: at its last, as the leaderboard ranks it), and what the editor reported per stream
    (BaFT's gate weights; lifelong's downstream score at each checkpoint)."""
    by_id = {case.case_id: case for case in cases}
    entries: dict[str, dict[str, Any]] = {}
    for r in results:
        case = by_id.get(r.case_id)
        if case is None:
            continue
        entry = entries.setdefault(r.case_id, {"prompt": case.prompt, "target": case.target_new,
                                               "rephrase": list(case.rephrase[:1]), "stream": r.stream,
                                               "details": {}})
        entry["details"][row_protocol(r.scores.protocol)] = dict(r.scores.details)
    return {"cases": entries, "streams": [dict(stream) for stream in streams]}


def cell_row(key: Mapping[str, Any], *, attempt: int, status: str, error: str | None = None,
             fields: Mapping[str, Any] | None = None, provenance: str = "") -> dict[str, Any]:
    """The store's row for one cell attempt, ok or failed: ``key`` says which cell (``cell_id``, the identifying
    columns, ``hparams``, ``code_version``, ``data_sha256``, and for a sweep trial ``kind``/``sweep``/``trial_id``);
    ``fields`` what its computation measured and when (timings, parameter counts, device, dtype, downstream
    scores, ``packages``, ``peak_rss_mb``, ``started_at``/``finished_at``, and what computed it: ``hardware``,
    the record of ``kebench.core.numerics.hardware_record``, ``numerics``, and ``notes``, the provenance notes
    one by one); ``provenance`` the notes on what the numbers depend on, joined.  A failed cell leaves out what it
    never measured (device and dtype stay "", hardware, numerics and notes NULL)."""
    return {**key, "attempt": attempt, "device": "", "dtype": "", **(fields or {}), "provenance": provenance,
            "status": status, "error": error}
