"""Issue 31, part B: a sweep never fails late and never mixes conditions.

Every bad value a sweep file can hold is one line naming the file, the key and the value, exit 2, in seconds,
before Ray or Tune start (not failed trials and ``RuntimeError: No best trial found`` 13–24 s later): values
the method's hyperparameter types refuse, values the model's config refuses (rank above the hidden size,
layers out of range), real-valued ranges for integer hyperparameters, infinite bounds, bad resources, and an
``--export`` path that cannot be written.  A resumed sweep whose benchmark data, base hyperparameter YAML or
model changed is refused the same way (its trials would be ranked across both); a store held by another
driver names the sweep and the key to change.  (``--restart`` fencing the old trials out of the ranking and the
export, and Tune's banner on stderr, run real sweeps: ``tests/test_sweep_resume.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 10.0
BASE: dict[str, Any] = {
    "name": "bad", "model": "tiny-random-llama", "method": "baft",
    "benchmark": {"name": "zsre", "split": "dev", "n": 2}, "scenario": {"kind": "continual", "T": 1},
    "metric": "avg", "search": "random", "samples": 1, "space": {"rank": {"choice": [2, 4]}},
}


def _sweep(tmp: Path, **changes: Any) -> str:
    spec = {**BASE, "store": str(tmp / "store"), **changes}
    path = tmp / "bad-sweep.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return str(path)


def _run(argv: list[str], capsys) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    return code, captured.out, captured.err, elapsed


def _one_line(code: int, out: str, err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out and out == ""
    assert len(lines) == 1, err
    return lines[0]


def _a_file(tmp: Path) -> str:
    (tmp / "a-file").write_text("x")
    return str(tmp / "a-file")


# (id, sweep-file changes, extra argv builder, the fragment after "bad-sweep.yaml: ")
CASES = [
    ("string-choice-for-int", {"space": {"rank": {"choice": ["4", 8]}}}, None,
     "space.rank.choice value '4': rank should be an integer, got '4'"),
    ("nan-choice", {"space": {"lr": {"choice": [float("nan")]}}}, None,
     "space.lr.choice value nan: lr should be a finite number, got nan"),
    ("randint-rank-above-hidden", {"space": {"rank": {"randint": [1000, 2000]}}}, None,
     "space.rank.randint value 1000: baft: rank must be in 1..64 (the model's hidden size), got 1000"),
    ("randint-high-end", {"space": {"rank": {"randint": [2, 100]}}}, None,
     "space.rank.randint value 99: baft: rank must be in 1..64"),
    ("layers-out-of-range", {"space": {"layers": {"choice": [[0], [99]]}}}, None,
     "space.layers.choice value [99]: baft: layers: layer 99 out of range for a model with 2 layers"),
    ("negative-lr", {"space": {"lr": {"choice": [0.01, -0.1]}}}, None, "space.lr.choice value -0.1: "),
    ("negative-lr-range", {"space": {"lr": {"uniform": [-0.1, 0.1]}}}, None, "space.lr.uniform value -0.1: "),
    ("uniform-for-int", {"space": {"max_steps": {"uniform": [10, 50]}}}, None,
     "space.max_steps.uniform: max_steps is an integer hyperparameter and uniform draws real numbers; "
     "use randint: [10, 50] or choice: [...]"),
    ("loguniform-for-int", {"space": {"rank": {"loguniform": [2, 8]}}}, None,
     "space.rank.loguniform: rank is an integer hyperparameter"),
    ("infinite-bound", {"space": {"lr": {"uniform": [0.1, float("inf")]}}}, None,
     "space.lr.uniform needs finite [low, high], got [0.1, inf]"),
    ("nan-bound", {"space": {"lr": {"loguniform": [float("nan"), 0.1]}}}, None,
     "space.lr.loguniform needs finite [low, high]"),
    ("num-cpus-text", {"resources": {"num_cpus": "x"}}, None, "resources.num_cpus must be a number >= 0, got 'x'"),
    ("num-cpus-negative", {"resources": {"num_cpus": -1}}, None, "resources.num_cpus must be a number >= 0, got -1"),
    ("num-cpus-too-many", {"resources": {"num_cpus": 64}}, None,
     "resources.num_cpus=64 but the local Ray instance has"),
    # --export that cannot be written: refused before any trial runs
    ("export-under-a-file", {}, lambda t: ["--export", _a_file(t) + "/best.yaml"], "is a file, not a directory"),
    ("export-in-proc", {}, lambda t: ["--export", "/proc/kebench-best.yaml"], "cannot create a file in /proc"),
    ("export-is-a-folder", {}, lambda t: ["--export", str(t)], "is a directory; name a YAML file"),
]


@pytest.mark.parametrize("changes, extra, fragment", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_bad_sweep_is_one_line_exit_2_before_tune(tmp_path, capsys, changes, extra, fragment):
    argv = ["sweep", "--sweep", _sweep(tmp_path, **changes), "--num-cpus", "2", *(extra(tmp_path) if extra else [])]
    code, out, err, elapsed = _run(argv, capsys)
    line = _one_line(code, out, err)
    assert fragment in line, line
    if not extra and "num_cpus=64" not in fragment:
        assert line.startswith("kebench: error: ") and "bad-sweep.yaml: " in line, line
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert not (tmp_path / "store").exists()  # nothing ran, nothing was written


def test_an_export_into_a_read_only_folder_is_refused_before_tune(tmp_path):
    """A read-only folder (a read-only bind mount as root, whom chmod does not stop)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    kebench = [sys.executable, "-m", "orchestrator.cli", "sweep", "--sweep", _sweep(tmp_path), "--num-cpus", "2",
               "--export", str(folder / "best.yaml")]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to make a read-only mount as root")
        script = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} {folder} || exit 77; "
                  + " ".join(f"'{part}'" for part in kebench))
        command = ["unshare", "-m", "sh", "-c", script]
    else:
        folder.chmod(0o555)
        command = kebench
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if done.returncode == 77:
        pytest.skip("cannot make a read-only mount here")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert f"--export {folder / 'best.yaml'}: cannot create a file in {folder}" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "store").exists()


def _fake_experiment(tmp: Path, **identity: str) -> Path:
    """A resumable Tune experiment as ``run_sweep`` leaves one (Tune's ``tuner.pkl`` is what ``can_restore``
    looks for), whose marker records ``identity``."""
    from orchestrator.sweep import load_sweep, sweep_identity
    from benchmarks.registry import select_cases

    spec = load_sweep(_sweep(tmp))
    now = sweep_identity(spec, select_cases("zsre", "dev", 2, 0).data_sha256)
    folder = tmp / "store" / "ray" / "bad"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")
    marker = {**json.loads(json.dumps(spec.fingerprint())), **now, **identity, "experiment": "0123456789ab"}
    (folder / "kebench-sweep.json").write_text(json.dumps(marker), encoding="utf-8")
    return folder


RESUME_CASES = [
    ("data", {"data_sha256": "f" * 64},
     "the benchmark data of zsre/dev changed since sweep 'bad' started in {folder} (ffffffffffff… → "),
    ("base-yaml", {"hparams_source": "hparams: methods/hparams/baft/tiny-random-llama.yaml (sha256 000000000000)"},
     "the base hyperparameters of baft on tiny-random-llama changed since sweep 'bad' started"),
    ("model", {"model_revision": "tiny-random-llama@old"}, "model tiny-random-llama changed since sweep 'bad' started"),
]


@pytest.mark.parametrize("identity, fragment", [case[1:] for case in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_a_resumed_sweep_whose_data_yaml_or_model_changed_is_refused(tmp_path, capsys, identity, fragment):
    folder = _fake_experiment(tmp_path, **identity)
    code, out, err, elapsed = _run(["sweep", "--sweep", _sweep(tmp_path), "--num-cpus", "2"], capsys)
    line = _one_line(code, out, err)
    assert fragment.format(folder=folder) in line and line.endswith("run with --restart to start afresh"), line
    assert elapsed < SECONDS
    assert not (tmp_path / "store" / "cells").exists()


@pytest.mark.parametrize("holder", ["grid", "sweep"])
def test_a_store_held_by_another_driver_names_the_sweep_and_its_store_key(tmp_path, capsys, holder):
    from results.store import StoreLock

    store = tmp_path / "store"
    store.mkdir()
    with StoreLock(store, holder):
        code, out, err, _ = _run(["sweep", "--sweep", _sweep(tmp_path), "--num-cpus", "2"], capsys)
    line = _one_line(code, out, err)
    assert f"store {store} is in use by another kebench {holder} (pid {os.getpid()} on " in line, line
    assert line.endswith(f"wait for it to finish or set another 'store:' in {tmp_path / 'bad-sweep.yaml'}")
    assert "--store" not in line


@pytest.mark.ray
def test_a_sweep_whose_every_trial_fails_is_one_line_exit_1_not_tunes_traceback(tmp_path, capsys):
    """A value only a run can refuse (BaFT overflows at lr = 1e38): the trial is stored as failed, the table shows
    it, and the command ends with one line and exit 1 instead of Tune's ``RuntimeError: No best trial found``."""
    sweep = _sweep(tmp_path, space={"lr": {"choice": [1.0e38]}, "max_steps": {"choice": [3]}})
    code = main(["sweep", "--sweep", sweep, "--num-cpus", "2", "--export", str(tmp_path / "best.yaml")])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err and "No best trial found" not in err
    errors = [line for line in err.splitlines() if line.startswith("kebench: error:")]
    assert len(errors) == 1 and "sweep 'bad': no trial finished (1 failed; first: " in errors[0], err
    assert "nothing to rank or export" in errors[0] and not (tmp_path / "best.yaml").exists()
    assert out.startswith("bad: ran; 1 trials in the store") and "| 1 | " in out  # the failed trial is listed
