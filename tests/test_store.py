"""The Parquet result store: atomic per-attempt files, schema validation, attempt bookkeeping."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from results.store import (
    CASES_SCHEMA,
    CELLS_SCHEMA,
    latest_attempts,
    next_attempt,
    package_versions,
    write_cell_attempt,
)

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def cell_row(cell_id: str = "c1", attempt: int = 1, status: str = "ok", **overrides) -> dict:
    row = dict(
        cell_id=cell_id, attempt=attempt, status=status, error=None if status == "ok" else "boom",
        model="smollm2-135m", benchmark="zsre", split="dev", n=2, offset=0, scenario="continual", T=2, B=1,
        method="baft", label="BaFT", seed=0, hparams={"lr": 0.01}, seconds_per_edit=1.5,
        trainable_params=1234, peak_rss_mb=800.0, device="cpu", dtype="float32", code_version="abc",
        data_sha256="0" * 64, provenance="", packages=json.dumps(package_versions()),
        started_at=NOW, finished_at=NOW,
    )
    row.update(overrides)
    return row


def case_rows(values: dict[str, float] | None = None) -> list[dict]:
    values = values or {"rel": 1.0, "loc": 0.5}
    return [dict(stream=0, case_id=case_id, metric=metric, value=value, protocol="teacher_forced")
            for case_id in ("q1", "q2") for metric, value in values.items()]


def files(store: Path) -> list[Path]:
    return sorted(path for path in store.rglob("*") if path.is_file())


def test_write_is_atomic_and_partitioned(tmp_path: Path) -> None:
    write_cell_attempt(tmp_path, cell_row(), case_rows())
    names = [path.relative_to(tmp_path).as_posix() for path in files(tmp_path)]
    assert names == ["cases/benchmark=zsre/model=smollm2-135m/method=baft/c1-a1.parquet",
                     "cells/benchmark=zsre/model=smollm2-135m/method=baft/c1-a1.parquet"]
    assert not any(".tmp" in name for name in names)
    cases = pq.read_table(tmp_path / names[0])
    cells = pq.read_table(tmp_path / names[1])
    assert cases.schema.equals(CASES_SCHEMA) and cells.schema.equals(CELLS_SCHEMA)
    assert cases.num_rows == 4 and set(cases.column("cell_id").to_pylist()) == {"c1"}
    assert cells.column("schema_version").to_pylist() == [1]
    assert json.loads(cells.column("hparams")[0].as_py()) == {"lr": 0.01}


def test_partition_values_are_path_safe(tmp_path: Path) -> None:
    write_cell_attempt(tmp_path, cell_row(model="meta-llama/Llama-2-7b", method="../x"), case_rows())
    (cell_file,) = (tmp_path / "cells").rglob("*.parquet")
    assert cell_file.relative_to(tmp_path / "cells").parts[:3] == (
        "benchmark=zsre", "model=meta-llama%2FLlama-2-7b", "method=%2E.%2Fx")
    from results.tables import connect

    with connect(tmp_path) as con:  # DuckDB decodes the hive values back to the originals
        assert con.execute("SELECT DISTINCT model, method FROM cases_all").fetchall() == [
            ("meta-llama/Llama-2-7b", "../x")]


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_cell_attempt(tmp_path, cell_row(), [dict(case_rows()[0], value="not a number")])
    assert files(tmp_path) == []


def test_missing_column_is_named(tmp_path: Path) -> None:
    row = cell_row()
    del row["data_sha256"]
    with pytest.raises(ValueError, match="missing column 'data_sha256'"):
        write_cell_attempt(tmp_path, row, case_rows())
    bad_case = case_rows()[0]
    del bad_case["protocol"]
    with pytest.raises(ValueError, match="case row 0: missing column 'protocol'"):
        write_cell_attempt(tmp_path, cell_row(), [bad_case])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scenario": "sequential"}, "column 'scenario' is 'sequential'"),
        ({"typo": 1}, "unknown column 'typo'"),
        ({"T": "ten"}, "column 'T' does not fit type int32"),
        ({"device": None}, "column 'device' must not be null"),
        ({"started_at": NOW.replace(tzinfo=None)}, "'started_at' must be timezone-aware"),
        ({"hparams": "{not json"}, "'hparams' is not valid JSON"),
    ],
)
def test_invalid_cell_values_are_named(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_cell_attempt(tmp_path, cell_row(**change), case_rows())
    assert files(tmp_path) == []


def test_case_rows_must_agree_with_their_cell(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="column 'seed' is 3 but the cell row says 0"):
        write_cell_attempt(tmp_path, cell_row(), [dict(case_rows()[0], seed=3)])
    with pytest.raises(ValueError, match="duplicate"):
        write_cell_attempt(tmp_path, cell_row(), case_rows() + case_rows()[:1])


def test_attempts(tmp_path: Path) -> None:
    assert latest_attempts(tmp_path / "missing") == {}
    assert next_attempt(tmp_path, "c1") == 1
    write_cell_attempt(tmp_path, cell_row(attempt=1, status="failed"), [])
    assert latest_attempts(tmp_path) == {"c1": (1, "failed")}
    assert next_attempt(tmp_path, "c1") == 2
    write_cell_attempt(tmp_path, cell_row(attempt=2), case_rows())
    write_cell_attempt(tmp_path, cell_row(cell_id="c2"), case_rows())
    assert latest_attempts(tmp_path) == {"c1": (2, "ok"), "c2": (1, "ok")}
    assert next_attempt(tmp_path, "c1") == 3
    with pytest.raises(FileExistsError):
        write_cell_attempt(tmp_path, cell_row(attempt=2), case_rows())


def test_orphan_cases_file_consumes_its_attempt_number(tmp_path: Path) -> None:
    """A crash between the two writes leaves a cases file; its attempt number must not be reused."""
    write_cell_attempt(tmp_path, cell_row(), case_rows())
    (tmp_path / "cells/benchmark=zsre/model=smollm2-135m/method=baft/c1-a1.parquet").unlink()
    assert latest_attempts(tmp_path) == {}
    assert next_attempt(tmp_path, "c1") == 2


def test_readers_ignore_temp_files(tmp_path: Path) -> None:
    write_cell_attempt(tmp_path, cell_row(), case_rows())
    leaf = tmp_path / "cells/benchmark=zsre/model=smollm2-135m/method=baft"
    (leaf / ".tmp-c9-a1-deadbeef.parquet.tmp").write_bytes(b"half-written")
    assert latest_attempts(tmp_path) == {"c1": (1, "ok")}
    assert next_attempt(tmp_path, "c9") == 1


def test_package_versions() -> None:
    versions = package_versions()
    assert {"duckdb", "pyarrow"} <= set(versions)
    assert all(isinstance(value, str) and value for value in versions.values())


# --------------------------------------------------------------------------- faults and the driver lock


def _stored_cell(store, cell_id="c1", attempt=1):
    write_cell_attempt(store, cell_row(cell_id, attempt=attempt), case_rows())


def test_scan_names_unreadable_files_and_incomplete_cells(tmp_path):
    from results.store import CASES_DIR, CELLS_DIR, quarantine, scan_store

    _stored_cell(tmp_path, "c1")
    _stored_cell(tmp_path, "c2")
    _stored_cell(tmp_path, "c3")
    c1 = next((tmp_path / CELLS_DIR).rglob("c1-a1.parquet"))
    c1.write_bytes(c1.read_bytes()[:30])  # truncated
    junk = c1.with_name("junk-a1.parquet")
    junk.write_text("junk")
    next((tmp_path / CASES_DIR).rglob("c2-a1.parquet")).unlink()  # cases gone: the cell is incomplete
    scan = scan_store(tmp_path)
    assert sorted(path.name for path, _ in scan.unreadable) == ["c1-a1.parquet", "junk-a1.parquet"]
    assert all("truncated or not Parquet" in reason for _, reason in scan.unreadable)
    assert set(scan.latest) == {"c2", "c3"} and scan.incomplete == {"c2"} and set(scan.usable()) == {"c3"}
    assert latest_attempts(tmp_path) == {"c2": (1, "ok"), "c3": (1, "ok")}  # never raises on a bad file
    moved = quarantine(c1)
    assert moved.name == "c1-a1.parquet.corrupt" and not c1.exists()
    assert next_attempt(tmp_path, "c1") == 2  # the cases file of attempt 1 still holds its number


def test_store_must_be_a_writable_directory(tmp_path):
    from kebench.core.errors import KebenchError
    from results.store import check_store_writable

    assert check_store_writable(tmp_path / "new" / "store").is_dir()
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(KebenchError, match="is a file"):
        check_store_writable(file)
    with pytest.raises(KebenchError, match="which is a file"):
        check_store_writable(file / "store")


def test_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    import multiprocessing
    import os

    from kebench.core.errors import KebenchError
    from results.store import StoreLock

    with StoreLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()

        def second() -> None:  # another process: flock conflicts across open file descriptions
            try:
                StoreLock(tmp_path).acquire()
                queue.put("acquired")
            except KebenchError as exc:
                queue.put(str(exc))

        child = ctx.Process(target=second)
        child.start()
        child.join(30)
        message = queue.get(timeout=5)
        assert f"is in use by another kebench grid (pid {os.getpid()} on " in message
    # Released (or its holder died, which releases a flock too): the next driver takes the file over.
    (tmp_path / ".kebench.lock").write_text('{"pid": 999999999, "host": "gone"}')
    with StoreLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
