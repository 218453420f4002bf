"""Issue 31, part A: the faults that live in the results layer, the model loader, plug-in loading, the store and
``kebench plan``.  Each is what the README promises (``When things go wrong``): one line naming the file, key or
value and exit 2 before work where it can be known before work, one line and exit 1 for what is found only
while working (an inexact restore), the page written with the bad file named (``kebench leaderboard``), and
never a traceback.

Cases run ``kebench`` in-process (``orchestrator.cli.main``) as ``tests/test_bad_inputs.py`` does; the plug-in
cases run in one subprocess (a plug-in registers itself for the life of a process), the full file systems in a
private mount namespace (a tmpfs, as root; skipped where that is not possible).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from helpers import put_cell
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
EDIT = ["edit", "--method", "reft", "--n", "1", "--quiet"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code: int, out: str, err: str, expected: int = 2) -> str:
    """The promise: exit ``expected``, exactly one line on stderr, no traceback anywhere; returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, err
    return lines[0]


def _grid(tmp: Path, **changes) -> str:
    spec = {"name": "bad", "store": str(tmp / "store"), "resources": {"num_cpus": 1, "num_gpus": 0},
            "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}], "methods": ["reft"], "seeds": [0]}
    spec.update(changes)
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


# --------------------------------------------------------------------------- leaderboard: a damaged store

ARTIFACT = {"cases": {"q1": {"prompt": "Who wrote Hamlet?", "target": "Marlowe", "rephrase": [], "stream": 0,
                             "details": {"teacher_forced": {"rel_output": " Shakes"}}}}, "streams": [{}]}


def _store(tmp: Path) -> Path:
    store = tmp / "store"
    put_cell(store, "unedited", 1, {"rel": [0.0, 0.0], "loc": [1.0, 1.0]}, scenario="single")
    put_cell(store, "good", 1, {"rel": [1.0, 1.0], "loc": [1.0, 1.0]}, scenario="single", artifact=ARTIFACT)
    put_cell(store, "bad", 1, {"rel": [1.0, 0.0], "loc": [1.0, 1.0]}, scenario="single", artifact=ARTIFACT)
    return store


def _file(store: Path, dataset: str, label: str) -> Path:
    return next((store / dataset).rglob(f"method={label}/*"))


@pytest.mark.parametrize("dataset", ["cells", "cases"])
@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_leaderboard_writes_the_page_and_names_an_unreadable_file(tmp_path, capsys, dataset, damage):
    store = _store(tmp_path)
    bad = _file(store, dataset, "bad")
    bad.write_bytes(bad.read_bytes()[:60] if damage == "truncated" else b"not parquet at all")
    code, out, err = _run(["leaderboard", "--store", str(store)], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert f"kebench: warning: skipped unreadable {bad} (" in err
    page = (store / "leaderboard" / "leaderboard.md").read_text()
    assert str(bad) in page and "| 1 | **good** |" in page  # the rest is ranked
    assert str(bad) in (store / "leaderboard" / "leaderboard.html").read_text()


def test_leaderboard_of_a_store_whose_cells_all_failed_shows_the_reasons(tmp_path, capsys):
    store = tmp_path / "store"
    put_cell(store, "reft", 1, status="failed", scenario="single")
    put_cell(store, "baft", 1, status="failed", scenario="single", seed=1)
    code, out, err = _run(["leaderboard", "--store", str(store)], capsys)
    assert code == 0 and not err, err
    page = (store / "leaderboard" / "leaderboard.md").read_text()
    assert "# Failed cells (latest attempt)" in page
    assert "| smollm2-135m · zsre/test · single · reft | 1 | OOM |" in page
    assert "| smollm2-135m · zsre/test · single · baft | 1 | OOM |" in page
    assert "OOM" in (store / "leaderboard" / "leaderboard.html").read_text()


@pytest.mark.parametrize("fault, why", [("missing", "is missing"), ("truncated", "is unreadable"),
                                        ("not-an-object", "is unreadable (a JSON list")])
def test_leaderboard_says_which_artifact_is_missing_instead_of_empty_cases(tmp_path, capsys, fault, why):
    store = _store(tmp_path)
    artifact = _file(store, "artifacts", "bad")
    if fault == "missing":
        artifact.unlink()
    elif fault == "truncated":
        artifact.write_text(artifact.read_text()[:20])
    else:
        artifact.write_text("[]")
    code, out, err = _run(["leaderboard", "--store", str(store)], capsys)
    assert code == 0 and "Traceback" not in err
    assert f"kebench: warning: artifact {artifact} {why}" in err
    page = (store / "leaderboard" / "leaderboard.md").read_text()
    assert "'' → target ''" not in page
    assert f"- `q1` (Rel. 0.00, Loc. 1.00): prompt, target and argmax unknown: artifact {artifact} {why}" in page
    assert f"artifact {artifact} {why}" in (store / "leaderboard" / "leaderboard.html").read_text()


SCRIPT = "<script>alert(1)</script>"


@pytest.mark.parametrize("where", ["prompt", "target", "argmax", "error", "note"])
def test_leaderboard_markdown_escapes_html_from_the_store(tmp_path, capsys, where):
    store = tmp_path / "store"
    case = {"prompt": "Who wrote Hamlet?", "target": "Marlowe", "details": {"teacher_forced": {"rel_output": " x"}}}
    if where in ("prompt", "target"):
        case[where] = SCRIPT
    elif where == "argmax":
        case["details"]["teacher_forced"]["rel_output"] = SCRIPT
    artifact = {"cases": {"q1": case}, "streams": [{}]}
    put_cell(store, "m", 1, {"rel": [1.0, 0.0]}, scenario="single", artifact=artifact,
             provenance=SCRIPT if where == "note" else "")
    if where == "error":  # a failed cell whose reason holds HTML
        from helpers import NOW
        from results.store import write_cell_attempt

        write_cell_attempt(store, dict(
            cell_id="x-err", attempt=1, status="failed", error=f"boom {SCRIPT}", model="smollm2-135m", benchmark="zsre",
            split="test", n=2, offset=0, scenario="single", T=1, B=1, method="x", label="x", seed=0, hparams="{}",
            device="cpu", dtype="float32", code_version="v", data_sha256="x", provenance="", packages="{}",
            started_at=NOW, finished_at=NOW), [])
    code, out, err = _run(["leaderboard", "--store", str(store)], capsys)
    assert code == 0, err
    markdown = (store / "leaderboard" / "leaderboard.md").read_text()
    page = (store / "leaderboard" / "leaderboard.html").read_text()
    assert "<script>" not in markdown and "&lt;script&gt;alert(1)&lt;/script&gt;" in markdown
    assert "<script>" not in page and "&lt;script&gt;" in page


@pytest.mark.parametrize("value, fragment", [("10000000", "argument --resamples: expected at most 100,000"),
                                             ("0", "argument --resamples: expected a positive integer")])
def test_resamples_are_capped(tmp_path, capsys, value, fragment):
    store = _store(tmp_path)
    line = _one_line(*_run(["leaderboard", "--store", str(store), "--resamples", value], capsys))
    assert fragment in line, line
    assert not (store / "leaderboard").exists()


def test_resamples_times_cases_are_capped_before_any_work(tmp_path, capsys, monkeypatch):
    import results.bootstrap

    monkeypatch.setattr(results.bootstrap, "MAX_RESAMPLED_CASES", 1000)  # two cases per group here
    store = _store(tmp_path)
    line = _one_line(*_run(["leaderboard", "--store", str(store), "--resamples", "501"], capsys))
    assert "--resamples 501 over a group of 2 cases" in line and "use --resamples 500 or fewer" in line, line
    assert not (store / "leaderboard" / "leaderboard.md").exists()


# --------------------------------------------------------------------------- kebench plan

def test_plan_warnings_go_to_stderr(tmp_path, capsys):
    code, out, err = _run(["plan", "--grid", _grid(tmp_path)], capsys)  # reft: never measured here
    assert code == 0
    assert "no timing known" not in out and "| tiny-random-llama | reft |" in out
    assert [line for line in err.splitlines() if line.strip()] == [
        line for line in err.splitlines() if line.startswith("kebench: warning: no timing known for reft")]


def test_plan_with_many_seeds_is_fast(tmp_path, capsys):
    """200,000 seeds took over 120 s (a quadratic duplicate check, each cell id hashed four times); 50,000
    here keep the test short (most of what is left is PyYAML reading the list)."""
    seeds = list(range(50_000))
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"name": "big", "store": str(tmp_path / "store"),
                                    "resources": {"num_cpus": 1, "num_gpus": 0}, "models": ["tiny-random-llama"],
                                    "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
                                    "scenarios": [{"kind": "single"}], "methods": ["reft"]}) + f"seeds: {seeds}\n")
    started = time.perf_counter()
    code, out, err = _run(["plan", "--grid", str(path), "--format", "json"], capsys)
    elapsed = time.perf_counter() - started
    assert code == 0, err
    assert json.loads(out)["cells"] == 50_000
    assert elapsed < 30, f"{elapsed:.1f} s"


def test_200000_seeds_are_checked_in_linear_time_and_a_duplicate_is_named():
    from kebench.core.errors import KebenchError
    from orchestrator.grid import Cell, _seeds

    started = time.perf_counter()
    assert len(_seeds(list(range(200_000)), "g.yaml")) == 200_000
    with pytest.raises(KebenchError, match=r"g\.yaml: seeds\[200000\]: duplicate seed 7"):
        _seeds(list(range(200_000)) + [7], "g.yaml")
    assert time.perf_counter() - started < 10  # was minutes: every seed compared with every earlier one
    assert "cell_id" in Cell.__dict__ and hasattr(Cell.__dict__["cell_id"], "attrname")  # cached, hashed once


# --------------------------------------------------------------------------- the store: full disk, stale files

def _no_room(monkeypatch, kind: str) -> None:
    import results.store as store_module

    if kind == "bytes":
        monkeypatch.setattr(store_module, "_room", lambda path: store_module.Room(4096, None))
    elif kind == "inodes":
        monkeypatch.setattr(store_module, "_room", lambda path: store_module.Room(10**9, 3))
    else:  # statvfs says there is room, the probe's data does not fit (a quota, delayed allocation)
        def no_space(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store_module.os, "fsync", no_space)


@pytest.mark.parametrize("kind, fragment", [("bytes", "(4,096 bytes free"), ("inodes", "and 3 inodes free"),
                                            ("probe-write", "is on a full file system")])
def test_full_store_is_one_line_before_any_cell_runs(tmp_path, capsys, monkeypatch, kind, fragment):
    _no_room(monkeypatch, kind)
    store = tmp_path / "store"
    line = _one_line(*_run(["grid", "--grid", _grid(tmp_path), "--quiet"], capsys))
    assert f"store {store} is on a full file system" in line and fragment in line, line
    assert not (store / "cells").exists() and not list(store.glob(".tmp-*"))


def test_no_space_during_a_write_names_the_store_and_the_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import results.store as store_module
    from kebench.core.errors import KebenchError

    real = pq.write_table

    def full(table, where, *args, **kwargs):
        Path(where).write_bytes(b"PAR1 half")  # the temporary file exists when the disk fills up
        raise OSError("No space left on device (error writing)")  # pyarrow's error: the text, no errno

    monkeypatch.setattr(store_module.pq, "write_table", full)
    store = tmp_path / "store"
    with pytest.raises(KebenchError) as caught:
        put_cell(store, "reft", 1, {"rel": [1.0]}, scenario="single")
    message = str(caught.value)
    assert isinstance(caught.value, store_module.StoreFullError)
    assert message.startswith(f"store {store} ran out of space writing cases/benchmark=zsre/")
    assert "computed but not stored" in message and "\n" not in message
    assert not [p for p in store.rglob("*") if p.name.startswith(".tmp-")]  # no temporary file left behind
    monkeypatch.setattr(store_module.pq, "write_table", real)
    put_cell(store, "reft", 1, {"rel": [1.0]}, scenario="single", attempt=2)  # room again: the next attempt stores


def _in_tmpfs(tmp_path: Path, options: str, prepare: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``kebench`` with its store on a fresh tmpfs mounted at ``tmp_path/mnt`` in a private mount namespace."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small tmpfs")
    mount = tmp_path / "mnt"
    mount.mkdir()
    kebench = " ".join(f"'{part}'" for part in [sys.executable, "-m", "orchestrator.cli", *argv])
    script = f"mount -t tmpfs -o {options} tmpfs {mount} || exit 77; {prepare}; {kebench}"
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    if done.returncode == 77:
        pytest.skip("cannot mount a tmpfs here")
    return done


@pytest.mark.parametrize("options, prepare, fragment", [
    ("size=64k", "dd if=/dev/zero of=MNT/fill bs=4k count=64 2>/dev/null; true", "(0 bytes"),
    ("size=8m,nr_inodes=6", "true", "inodes free"),
], ids=["no-bytes", "no-inodes"])
def test_a_real_full_file_system_is_refused_in_one_line(tmp_path, options, prepare, fragment):
    store = tmp_path / "mnt" / "store"
    done = _in_tmpfs(tmp_path, options, prepare.replace("MNT", str(tmp_path / "mnt")),
                     ["grid", "--grid", _grid(tmp_path), "--store", str(store), "--quiet"])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and f"store {store} is on a full file system" in lines[0] and fragment in lines[0], lines


@pytest.mark.ray
def test_a_disk_that_fills_up_mid_grid_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Past the probe, the first store write fails: the grid stops with one line naming the store and exit 2."""
    import results.store as store_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.pq, "write_table", full)  # only the driver writes
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    code, out, err = _run(["grid", "--grid", _grid(tmp_path), "--quiet", "--tables", "none"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("kebench: error:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and f"store {tmp_path / 'store'} ran out of space writing cases/" in errors[0], err
    assert not list((tmp_path / "store").rglob("*.parquet"))


def test_stale_temporary_files_are_removed_by_the_lock_holder_only(tmp_path):
    from results.store import STALE_TMP_SECONDS, StoreLock

    store = tmp_path / "store"
    put_cell(store, "reft", 1, {"rel": [1.0]}, scenario="single")
    folder = next((store / "cells").rglob("method=reft"))
    old = [folder / ".tmp-killed-1234abcd.parquet.tmp", store / "artifacts" / ".tmp-x-1.json.tmp",
           store / ".tmp-probe-1-abcd.tmp"]
    fresh = folder / ".tmp-live-5678abcd.parquet.tmp"  # a write in progress (touched just now)
    for path in [*old, fresh]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"PAR1")
    past = time.time() - STALE_TMP_SECONDS - 5
    for path in old:
        os.utime(path, (past, past))
    with StoreLock(store) as lock:
        assert sorted(lock.cleaned) == sorted(old)
    assert fresh.exists() and not any(path.exists() for path in old)
    assert len(list(store.rglob("*.parquet"))) == 2  # stored files untouched


# --------------------------------------------------------------------------- path: models

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    from test_any_model import save_tiny

    return save_tiny(tmp_path_factory.mktemp("model") / "qwen2", "qwen2")


def _damaged(saved: Path, tmp: Path, fault: str) -> Path:
    folder = tmp / fault
    if fault == "loop-folder":
        folder.symlink_to(folder)
        return folder
    shutil.copytree(saved, folder)
    weights = folder / "model.safetensors"
    if fault == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif fault == "empty":
        weights.write_bytes(b"")
    elif fault == "header-only":
        weights.write_bytes(weights.read_bytes()[:5])
    elif fault == "loop-weights":
        weights.unlink()
        weights.symlink_to(weights)
    elif fault == "dangling":
        weights.unlink()
        weights.symlink_to(tmp / "nowhere.safetensors")
    elif fault == "missing-shard":
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif fault == "no-tokenizer":
        for file in folder.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens")):
                file.unlink()
    elif fault == "t5":
        (folder / "config.json").write_text(json.dumps(
            {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True,
             "num_layers": 2, "d_model": 64, "vocab_size": 259}))
    return folder


PATH_CASES = [
    ("truncated", "model.safetensors is truncated ("),
    ("empty", "model.safetensors is empty (0 bytes)"),
    ("header-only", "model.safetensors is truncated (5 bytes"),
    ("loop-folder", "loop-folder is a symlink loop"),
    ("loop-weights", "model.safetensors is a symlink loop"),
    ("dangling", "model.safetensors is a dangling symlink (to "),
    ("missing-shard", "names the shard model-00002-of-00002.safetensors, which is missing"),
    ("no-tokenizer", "has no tokenizer files (one of tokenizer.json"),
    ("t5", "model type 't5' (T5ForConditionalGeneration) is an encoder-decoder architecture, which kebench does "
           "not support: it edits decoder-only causal LMs; supported model types: gemma, gpt2, llama"),
]


@pytest.mark.parametrize("fault, fragment", PATH_CASES, ids=[case[0] for case in PATH_CASES])
def test_a_broken_model_folder_is_one_line_before_work(tmp_path, capsys, saved_model, fault, fragment):
    folder = _damaged(saved_model, tmp_path, fault)
    started = time.perf_counter()
    line = _one_line(*_run([*EDIT, "--model", f"path:{folder}"], capsys))
    assert line.startswith(f"kebench: error: model 'path:{folder}") and fragment in line, line
    assert time.perf_counter() - started < 10  # before any weights load


def test_a_broken_model_folder_stops_a_grid_before_ray(tmp_path, capsys, saved_model):
    folder = _damaged(saved_model, tmp_path, "truncated")
    line = _one_line(*_run(["grid", "--grid", _grid(tmp_path, models=[f"path:{folder}"]), "--quiet"], capsys))
    assert "model.safetensors is truncated" in line
    assert not (tmp_path / "store" / "cells").exists()


# --------------------------------------------------------------------------- plug-ins

PLUGINS = {
    "exits": "import sys\nsys.exit(3)\n",
    "shadow": textwrap.dedent('''
        from dataclasses import dataclass
        from kebench import Editor, EditStats, register_method

        @dataclass(frozen=True)
        class H:
            lr: float = 0.1

        @register_method("baft")  # kebench's own BaFT: refused
        class Shadow(Editor):
            hparams_class = H
            needs_hparams_file = False
            def apply(self, cases): return EditStats(1, 0.0)
            def restore(self): pass
            def trainable_parameters(self): return 0
        '''),
    "leaky": textwrap.dedent('''
        from dataclasses import dataclass
        import torch
        from kebench import Editor, EditStats, register_method

        @dataclass(frozen=True)
        class H:
            scale: float = 0.5

        @register_method("leaky")
        class Leaky(Editor):
            """Scales the output head and never puts it back: an inexact restore."""
            hparams_class = H
            needs_hparams_file = False
            def apply(self, cases):
                with torch.no_grad():
                    self.lm.lm_head.weight.mul_(1 + self.hparams.scale)
                return EditStats(1, 0.0)
            def restore(self): pass
            def trainable_parameters(self): return 0
        '''),
}

TINY_EDIT = ["edit", "--model", "tiny-random-llama", "--n", "1", "--quiet", "--split", "dev"]
# (id, argv, exit code, fragment of stdout or of the one stderr line)
PLUGIN_CASES = [
    ("exit-at-import-list", ["list"], 0,
     "failed:     plugin 'exits = kebench_test_exits' from distribution 'kebench-test-exits' failed to load: "
     "SystemExit: it called sys.exit(3) while being imported"),
    ("exit-at-import-hparams", ["hparams", "--method", "reft", "--model", "tiny-random-llama"], 0, "# reft on"),
    ("builtin-name-list", ["list"], 0,
     "failed:     plugin 'shadow = kebench_test_shadow' from distribution 'kebench-test-shadow' failed to load: "
     "NameTaken: method 'baft' is already registered"),
    ("builtin-name-edit", [*TINY_EDIT, "--method", "baft"], 2,
     "kebench: error: method 'baft' is ambiguous: plug-in 'shadow = kebench_test_shadow' (distribution "
     "'kebench-test-shadow') also registers 'baft'"),
    ("builtin-name-hparams", ["hparams", "--method", "baft", "--model", "tiny-random-llama"], 2,
     "method 'baft' is ambiguous"),
    ("inexact-restore-edit", [*TINY_EDIT, "--method", "leaky"], 1,
     "kebench: error: RestoreError: leaky: restore() did not return the model to its original outputs (stream 0)"),
]

_DRIVER = textwrap.dedent('''
    import contextlib, io, json, sys
    from orchestrator.cli import main
    results = {}
    for name, argv in json.loads(sys.argv[1]).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:
                import traceback
                traceback.print_exc(file=err)
                code = "raised"
        results[name] = [code, out.getvalue(), err.getvalue()]
    print("RESULTS " + json.dumps(results))
''')


@pytest.fixture(scope="module")
def plugin_runs(tmp_path_factory) -> dict[str, list]:
    """Every plug-in case in one interpreter that has the three broken plug-ins installed (as dist-info)."""
    site = tmp_path_factory.mktemp("plugins")
    for name, source in PLUGINS.items():
        (site / f"kebench_test_{name}.py").write_text(source)
        dist = site / f"kebench_test_{name}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kebench-test-{name}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[kebench.methods]\n{name} = kebench_test_{name}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])}
    cases = {case[0]: case[1] for case in PLUGIN_CASES}
    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name, code, fragment", [case[:1] + case[2:] for case in PLUGIN_CASES],
                         ids=[case[0] for case in PLUGIN_CASES])
def test_broken_plugins_are_one_line(plugin_runs, name, code, fragment):
    got, out, err = plugin_runs[name]
    if code == 0:
        assert got == 0 and "Traceback" not in err and fragment in out, (got, err)
    else:
        line = _one_line(got, out, err, expected=code)
        assert fragment in line, line


def test_debug_shows_the_traceback_behind_the_one_line(tmp_path, capsys):
    code, out, err = _run(["--debug", "edit", "--model", f"path:{tmp_path / 'nowhere'}", "--method", "reft"], capsys)
    assert code == 2 and "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("kebench: error: model 'path:")
