"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from benchmarks.case import EditCase, PromptAnswer
from results.store import write_cell_attempt

NOW = dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc)


def put_cell(store: Path, label: str, T: int, values: dict[str, list[float]] | None = None, *, status: str = "ok",
             attempt: int = 1, scenario: str = "continual", seed: int = 0, B: int = 1, benchmark: str = "zsre",
             model: str = "smollm2-135m", protocol: str = "teacher_forced", provenance: str = "",
             seconds: float | None = 1.0, params: int | None = 100, downstream: tuple | None = None,
             method: str | None = None, artifact: dict | None = None) -> str:
    """Store one cell attempt whose case q<i> scores values[metric][i]; returns its cell_id."""
    cell_id = f"{model}-{benchmark}-{scenario}-{label}-T{T}-B{B}-s{seed}-{protocol}"
    cell = dict(cell_id=cell_id, attempt=attempt, status=status, error=None if status == "ok" else "OOM",
                model=model, benchmark=benchmark, split="test", n=2, offset=0, scenario=scenario, T=T, B=B,
                method=method or label.lower(), label=label, seed=seed, hparams="{}", seconds_per_edit=seconds,
                trainable_params=params, peak_rss_mb=None, device="cpu", dtype="float32", code_version="v",
                data_sha256="x", provenance=provenance, packages="{}", started_at=NOW, finished_at=NOW)
    if downstream is not None:  # (name, items, unedited, edited); a failed cell carries only the name
        cell.update(zip(("downstream", "downstream_items", "downstream_unedited", "downstream_edited"), downstream))
    cases = [dict(stream=0, case_id=f"q{index}", metric=metric, value=value, protocol=protocol)
             for metric, scores in (values or {}).items() for index, value in enumerate(scores)]
    write_cell_attempt(store, cell, cases, artifact)
    return cell_id


def toy_cases(n: int = 2, irrelevant: bool = True) -> list[EditCase]:
    """Small ZsRE-shaped cases with a rephrase, a locality and a portability prompt each."""
    subjects = ["Anna Vale", "Boris Kett", "Clara Moss", "Dario Flint"]
    targets = ["Oslo", "Lima", "Quito", "Riga"]
    cases = []
    for index in range(n):
        subject, target = subjects[index % 4], targets[index % 4]
        cases.append(EditCase(
            case_id=f"toy-{index}", prompt=f"{subject} was born in", target_new=target, subject=subject,
            rephrase=(f"The birthplace of {subject} is",),
            locality={"nq": (PromptAnswer("nq question: who wrote hamlet", "Shakespeare"),)},
            portability={"reasoning": (PromptAnswer(f"The country {subject} was born in is", "Norway"),)},
            irrelevant=(PromptAnswer("nq question: what is the capital of peru", "Lima"),) if irrelevant else (),
        ))
    return cases
