"""The exported-hyperparameter file: what ``kebench sweep --export`` writes and a grid's ``hparams_file`` reads.

The file is a hyperparameter YAML (``methods.hparams.read_hparams_file`` reads it like any other) whose
comment header carries one ``# kebench-sweep: {...}`` line: the sweep's identity (its name, benchmark,
dev split, case ids and their hash, the chosen trial and score).  Grid expansion reads that line for two
things: every row's provenance says which sweep the values came from (``hparams_file_origin``), and a
grid whose reported cases overlap the cases the sweep tuned on is refused (``check_hparams_file_leakage``).

The sweep writes the file (``write_export``); grid expansion only reads it, so this module sits below both.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from benchmarks.registry import select_cases
from kebench.core.errors import KebenchError

EXPORT_MARK = "# kebench-sweep: "


def write_export(path: str | os.PathLike[str], header: Sequence[str], identity: Mapping[str, Any],
                 hparams: Mapping[str, Any]) -> None:
    """Write ``hparams`` (sorted) as a hyperparameter YAML after the comment ``header`` and the identity line,
    atomically (a temporary file renamed into place)."""
    target = Path(path)
    if target.is_dir():
        raise KebenchError(f"--export {target} is a directory; name a YAML file")
    lines = [*header, EXPORT_MARK + json.dumps(dict(identity), sort_keys=True, separators=(",", ":"))]
    body = yaml.safe_dump(dict(sorted(hparams.items())), sort_keys=False, default_flow_style=None)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{target.name}")
    temporary.write_text("\n".join(lines) + "\n" + body, encoding="utf-8")
    os.replace(temporary, target)


def check_export_target(path: str | os.PathLike[str], flag: str = "--export") -> None:
    """The export file can be written: not a directory, not under a file, and a file can be created in the
    nearest existing folder (a probe file, created and removed: root passes ``os.access`` on a read-only mount
    or ``/proc``, where creating a file still fails).  Checked before a sweep's trials run."""
    target = Path(path)
    if target.is_dir():
        raise KebenchError(f"{flag} {target} is a directory; name a YAML file")
    folder = next((parent for parent in target.parents if parent.exists()), Path("."))
    if not folder.is_dir():
        raise KebenchError(f"{flag} {target}: {folder} is a file, not a directory")
    try:
        handle, probe = tempfile.mkstemp(prefix=".kebench-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise KebenchError(f"{flag} {target}: cannot create a file in {folder} ({exc.strerror or exc})") from None
    if target.exists() and not os.access(target, os.W_OK):
        raise KebenchError(f"{flag} {target} is not writable")


def case_ids_sha256(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def read_export_identity(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``# kebench-sweep: {...}`` identity of an exported hyperparameter file (None: not from a sweep)."""
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(EXPORT_MARK):
                    try:
                        identity = json.loads(line[len(EXPORT_MARK):])
                    except ValueError:
                        raise KebenchError(f"{path}: unreadable '{EXPORT_MARK.strip()}' line") from None
                    ids = identity.get("case_ids")
                    if not isinstance(ids, list) or case_ids_sha256(ids) != identity.get("case_ids_sha256"):
                        raise KebenchError(f"{path}: the '{EXPORT_MARK.strip()}' line's case ids do not match "
                                           "their hash (edited by hand?)")
                    return identity
                if line.strip() and not line.startswith("#"):
                    return None
    except (OSError, UnicodeDecodeError):
        return None
    return None


def hparams_file_origin(path: str | os.PathLike[str]) -> str:
    """A provenance fragment for a grid row: which sweep an exported hyperparameter file came from ('' if none)."""
    identity = read_export_identity(path)
    if not identity:
        return ""
    return (f"from sweep {identity.get('sweep')} trial {identity.get('trial_id')} on {identity.get('benchmark')}/"
            f"{identity.get('split')} n={identity.get('n')} offset={identity.get('offset')}")


def check_hparams_file_leakage(grid: Any, cells: Sequence[Any] | None = None, data_dir: str | None = None) -> None:
    """Refuse a grid that reports (split other than dev) cases a sweep tuned its ``hparams_file`` on.

    Overlap is by case id within one benchmark, and by prompt text across benchmarks (the same fact in
    two benchmark files).  One-line ``KebenchError`` naming the grid, the method entry and the file."""
    root = data_dir if data_dir is not None else getattr(grid, "data_dir", None)
    if cells is not None:
        reported = sorted({(c.benchmark, c.split, c.n, c.offset) for c in cells}, key=str)
    else:
        reported = sorted({(b.benchmark if hasattr(b, "benchmark") else b.name, b.split, b.n, b.offset)
                           for b in grid.benchmarks}, key=str)
    loaded: dict[tuple, Any] = {}

    def load(key: tuple) -> Any:
        if key not in loaded:
            loaded[key] = select_cases(key[0], key[1], key[2], key[3], root)
        return loaded[key]

    for index, method in enumerate(grid.methods):
        if not getattr(method, "hparams_file", None):
            continue
        identity = read_export_identity(method.hparams_file)
        if identity is None:
            continue
        tuned_ids = set(identity["case_ids"])
        tuned_prompts: set[str] = set()
        try:
            tuned = load((identity["benchmark"], identity["split"], identity["n"], identity["offset"]))
            if case_ids_sha256([c.case_id for c in tuned.cases]) == identity["case_ids_sha256"]:
                tuned_prompts = {" ".join(c.prompt.split()).lower() for c in tuned.cases}
        except KebenchError:
            pass  # the sweep's data is not here: compare by case id only
        for benchmark, split, n, offset in reported:
            if split == "dev":
                continue
            selection = load((benchmark, split, n, offset))
            overlap = [c.case_id for c in selection.cases
                       if (benchmark == identity["benchmark"] and c.case_id in tuned_ids)
                       or " ".join(c.prompt.split()).lower() in tuned_prompts]
            if overlap:
                raise KebenchError(
                    f"{grid.source}: methods[{index}] ('{method.label}').hparams_file {method.hparams_file} was tuned "
                    f"by sweep '{identity.get('sweep')}' on {identity['benchmark']}/{identity['split']} "
                    f"n={identity['n']} offset={identity['offset']}, which overlaps the reported {benchmark}/{split} "
                    f"n={n} offset={offset} in {len(overlap)} case(s) (e.g. {overlap[0]}): tuning on test cases "
                    "leaks; report on a disjoint split")
