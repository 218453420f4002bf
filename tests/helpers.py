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
             method: str | None = None, artifact: dict | None = None, notes: list[str] | None = None,
             hardware: dict | None = None) -> str:
    """Store one cell attempt whose case q<i> scores values[metric][i]; returns its cell_id.  ``notes``: the
    provenance notes one by one (``provenance`` then defaults to them joined); ``hardware``: its record."""
    cell_id = f"{model}-{benchmark}-{scenario}-{label}-T{T}-B{B}-s{seed}-{protocol}"
    cell = dict(cell_id=cell_id, attempt=attempt, status=status, error=None if status == "ok" else "OOM",
                model=model, benchmark=benchmark, split="test", n=2, offset=0, scenario=scenario, T=T, B=B,
                method=method or label.lower(), label=label, seed=seed, hparams="{}", seconds_per_edit=seconds,
                trainable_params=params, peak_rss_mb=None, device="cpu", dtype="float32", code_version="v",
                data_sha256="x", provenance=provenance or "; ".join(notes or []), packages="{}", started_at=NOW,
                finished_at=NOW, notes=notes, hardware=hardware)
    if downstream is not None:  # (name, items, unedited, edited); a failed cell carries only the name
        cell.update(zip(("downstream", "downstream_items", "downstream_unedited", "downstream_edited"), downstream))
    cases = [dict(stream=0, case_id=f"q{index}", metric=metric, value=value, protocol=protocol)
             for metric, scores in (values or {}).items() for index, value in enumerate(scores)]
    write_cell_attempt(store, cell, cases, artifact)
    return cell_id


def missing_data(needs: tuple[str, ...], data_dir: Path | None = None) -> list[str]:
    """The data files that no search root holds (the embedded ZsRE file counts as held) among ``needs``: each a
    ``kebench data fetch --benchmark`` group (all its files) or one manifest file name such as
    ``knowedit/wiki_recent_train.json``; ``data_dir``: the resolved default when ``None``."""
    from benchmarks.data import locate, resolve_data_dir
    from benchmarks.manifest import entries_for, entry_for, group_names

    names: list[str] = []
    for need in needs:
        if entry_for(need) is not None:
            names.append(need)
        elif need in group_names():
            names.extend(entry.name for entry in entries_for(need))
        else:
            raise ValueError(f"needs_data: {need!r} is neither a data group ({', '.join(group_names())}) "
                             "nor a manifest file")
    root = resolve_data_dir() if data_dir is None else data_dir
    return [name for name in dict.fromkeys(names) if locate(root, name) is None]


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


# --------------------------------------------------------------------------- editors on the tiny model

import torch  # noqa: E402

from benchmarks.metrics import encode  # noqa: E402
from methods.base import get_method  # noqa: E402
from methods.hparams import load_hparams
from orchestrator.scenarios import PROBE_TEXTS  # noqa: E402

#: Two invented facts the tiny model cannot know, with everything every method and metric needs.
TOY_CASES = (
    EditCase("t0", "The capital of Atlantis is", "Poseidonia", subject="Atlantis",
             locality={"nq": (PromptAnswer("Grass is", "green"),)}, rephrase=("Atlantis has its capital in",),
             irrelevant=(PromptAnswer("The sky is", "blue"),)),
    EditCase("t1", "The inventor of the zorb is", "Quill", subject="the zorb",
             locality={"nq": (PromptAnswer("Snow is", "white"),)}, rephrase=("Who invented the zorb?",),
             irrelevant=(PromptAnswer("Fire is", "hot"),)),
)


def make_editor(lm, method: str, scenario: str = "single", **overrides):
    """The method's editor on ``lm`` with its shipped YAML for that model plus ``overrides``, seed 0."""
    return get_method(method)(lm, load_hparams(method, lm.name, scenario, overrides), seed=0)


def plain_forward(lm, pairs):
    """(batch, logits) of the unedited forward pass over ``prompt + " " + answer`` pairs."""
    batch = encode(lm.tokenizer, pairs, lm.pad_token_id)
    with torch.no_grad():
        return batch, lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def probe_logits(lm) -> torch.Tensor:
    """Logits on the scenario runner's restore probes (unrelated prompts)."""
    return plain_forward(lm, [(text, "X") for text in PROBE_TEXTS])[1]


def state_snapshot(lm) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in lm.model.state_dict().items()}


def changed_keys(lm, snapshot: dict[str, torch.Tensor]) -> set[str]:
    current = lm.model.state_dict()
    return {key for key in set(current) | set(snapshot)
            if key not in current or key not in snapshot or not torch.equal(current[key], snapshot[key])}
