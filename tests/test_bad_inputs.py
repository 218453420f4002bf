"""Every bad input is one line naming the flag, file, record or value, exit code 2, no traceback, before any
work is done (issues 15 and 18): the probe's table as parametrized cases, then the hangs and the late
validation (which must fail in seconds, before Ray starts or a model loads).

Each case runs ``kebench`` in-process (``orchestrator.cli.main``), so a case costs the work kebench does,
not interpreter start-up; ``test_end_to_end_*`` run a few of them as real subprocesses.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.data import data_file, resolve_data_dir
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = resolve_data_dir()  # $KEBENCH_DATA, else ../shared/data beside the checkout
ZSRE = "zsre/zsre_mend_eval_portability_gpt4.json"
CF_TEST = "knowedit/wiki_counterfact_test_cf.json.gz"
EDIT = ["edit", "--model", "tiny-random-llama", "--method", "reft", "--n", "1", "--quiet"]
SECONDS = 10.0  # the bound for every case, hangs included


def _grid(tmp: Path, **changes) -> str:
    spec = {"name": "bad", "store": str(tmp / "store"), "resources": {"num_cpus": 1, "num_gpus": 0},
            "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}], "methods": ["reft"], "seeds": [0]}
    spec.update(copy.deepcopy(changes))
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _zsre_dir(tmp: Path, change) -> str:
    """A data directory whose ZsRE file holds three real records, the second changed by ``change``."""
    records = json.loads(data_file(DATA, ZSRE).read_text(encoding="utf-8"))[:3]  # the embedded copy if need be
    change(records[1])
    (tmp / "data" / "zsre").mkdir(parents=True)
    (tmp / "data" / ZSRE).write_text(json.dumps(records), encoding="utf-8")
    return str(tmp / "data")


def _truncated_gz(tmp: Path) -> str:
    (tmp / "data" / "knowedit").mkdir(parents=True)
    whole = (DATA / CF_TEST).read_bytes()
    (tmp / "data" / CF_TEST).write_bytes(whole[: len(whole) // 2])
    return str(tmp / "data")


def _non_utf8_yaml(tmp: Path) -> str:
    path = tmp / "latin1.yaml"
    path.write_bytes("layers: [0]\nrank: 4\nlr: 1.0e-3\n# caf\xe9\n".encode("latin-1"))
    return str(path)


def _a_file(tmp: Path) -> str:
    path = tmp / "a-file"
    path.write_text("x")
    return str(path)


# (id, argv builder: tmp -> argv, a fragment the one line must contain)
CASES = [
    # --- issue 15's table
    ("edit-lr-nan", lambda t: [*EDIT, "--set", "lr=nan"], "lr should be a finite number"),
    ("edit-lr-dot-nan", lambda t: [*EDIT, "--set", "lr=.nan"], "lr should be a finite number"),
    ("grid-lr-nan", lambda t: ["grid", "--grid", _grid(t, methods=[{"name": "reft", "hparams": {"lr": float("nan")}}])],
     "lr should be a finite number"),
    ("edit-lr-inf", lambda t: [*EDIT, "--set", "lr=inf"], "lr should be a finite number"),
    ("hparams-not-utf8", lambda t: [*EDIT, "--hparams", _non_utf8_yaml(t)], "not UTF-8"),
    ("device-nosuch", lambda t: [*EDIT, "--device", "nosuch"], "--device: device 'nosuch' is not a torch device"),
    ("edit-seed-overflow", lambda t: [*EDIT, "--seed", "99999999999999999999"], "--seed"),
    ("edit-seed-negative", lambda t: [*EDIT, "--seed", "-1"], "--seed"),
    ("grid-seed-overflow", lambda t: ["grid", "--grid", _grid(t, seeds=[99999999999999999999])], "seeds[0]"),
    ("out-is-directory", lambda t: [*EDIT, "--out", str(t)], "is a directory"),
    ("out-under-a-file", lambda t: [*EDIT, "--out", _a_file(t) + "/run.jsonl"], "is a file, not a directory"),
    ("empty-prompt", lambda t: [*EDIT, "--data-dir", _zsre_dir(t, lambda r: r.update(src=""))],
     "record 1: field 'src' is empty"),
    ("empty-rephrase", lambda t: [*EDIT, "--data-dir", _zsre_dir(t, lambda r: r.update(rephrase="  "))],
     "record 1: field 'rephrase' is empty"),
    ("empty-target", lambda t: [*EDIT, "--data-dir", _zsre_dir(t, lambda r: r.update(alt=""))],
     "record 1: field 'alt' is empty"),
    ("null-answer", lambda t: [*EDIT, "--data-dir", _zsre_dir(t, lambda r: r.update(answers=[None]))],
     "record 1: answers[0] is null"),
    ("grid-empty-prompt", lambda t: ["grid", "--grid", _grid(t), "--data-dir", _zsre_dir(t, lambda r: r.update(src=""))],
     "record 1: field 'src' is empty"),
    ("truncated-json-gz", lambda t: [*EDIT, "--benchmark", "wikidata-counterfact", "--data-dir", _truncated_gz(t)],
     "truncated or damaged gzip file"),
    ("num-cpus-too-many", lambda t: ["grid", "--grid", _grid(t, resources={"num_cpus": 64})],
     "resources.num_cpus=64 but the local Ray instance has"),
    # --- issue 18: hangs
    ("ray-address-closed-port", lambda t: ["grid", "--grid", _grid(t), "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: no Ray cluster answers there"),
    # --- issue 18: late validation, now at grid expansion from the model's config (no weights loaded)
    ("baft-layers", lambda t: ["grid", "--grid", _grid(t, methods=[{"name": "baft", "hparams": {"layers": [7]}}])],
     "layer 7 out of range for a model with 2 layers"),
    ("rome-layers", lambda t: ["grid", "--grid", _grid(t, methods=[{"name": "rome", "hparams": {"layers": [7]}}])],
     "layer 7 out of range"),
    ("ft-l-layers", lambda t: ["grid", "--grid", _grid(t, methods=[{"name": "ft-l", "hparams": {"layers": [-3]}}])],
     "layer -3 out of range"),
    ("rank-above-hidden", lambda t: ["grid", "--grid", _grid(t, methods=[{"name": "reft", "hparams": {"rank": 65}}])],
     "rank must be in 1..64"),
    ("edit-rank-above-hidden", lambda t: [*EDIT, "--set", "rank=65"], "rank must be in 1..64"),
    ("wise-without-unrelated-texts", lambda t: ["grid", "--grid", _grid(
        t, methods=["wise"], benchmarks=[{"name": "wikibio", "split": "test", "n": 2}])],
     "wikibio-test-0 has no unrelated training text"),
    ("edit-wise-without-unrelated-texts", lambda t: [*EDIT[:4], "wise", "--n", "1", "--benchmark", "counterfact"],
     "has no unrelated training text"),
    ("store-is-a-file", lambda t: ["grid", "--grid", _grid(t), "--store", _a_file(t)], "is a file; choose a directory"),
    ("store-under-a-file", lambda t: ["grid", "--grid", _grid(t), "--store", _a_file(t) + "/store"],
     "which is a file"),
    # --- issue 18, item 6
    ("num-gpus-negative", lambda t: ["grid", "--grid", _grid(t), "--num-gpus", "-1"], "--num-gpus"),
    ("num-gpus-nan", lambda t: ["grid", "--grid", _grid(t), "--num-gpus", "nan"], "--num-gpus"),
    ("table-store-is-a-file", lambda t: ["table", "--store", _a_file(t)], "is a file, not a store directory"),
    ("grid-data-dir-missing", lambda t: ["grid", "--grid", _grid(t, data_dir=str(t / "nowhere"))], "data_dir:"),
    ("hparams-is-a-directory", lambda t: [*EDIT, "--hparams", str(t)], "--hparams"),
]


def _run(argv: list[str], capsys) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    return code, captured.out, captured.err, elapsed


# The cases that read benchmark files beyond the embedded ZsRE file (skipped where they are not fetched).
NEEDS_DATA = {"truncated-json-gz": "wikidata-counterfact", "wise-without-unrelated-texts": "wikibio",
              "edit-wise-without-unrelated-texts": "counterfact"}


@pytest.mark.parametrize("build, fragment", [
    pytest.param(build, fragment, id=name,
                 marks=[pytest.mark.needs_data(NEEDS_DATA[name])] if name in NEEDS_DATA else [])
    for name, build, fragment in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, build, fragment):
    code, out, err, elapsed = _run(build(tmp_path), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert not (tmp_path / "store" / "cells").exists()  # nothing ran


def test_cuda_on_a_cpu_build_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err, _ = _run([*EDIT, "--device", "cuda"], capsys)
    assert code == 2 and err.count("\n") == 1 and "CUDA is not available here" in err


def test_read_only_store_is_refused_before_any_cell_runs(tmp_path):
    """A read-only store directory (a read-only bind mount when running as root, whom chmod does not stop)."""
    store = tmp_path / "ro-store"
    store.mkdir()
    grid = _grid(tmp_path)
    kebench = [sys.executable, "-m", "orchestrator.cli", "grid", "--grid", grid, "--store", str(store), "--quiet"]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare to make a read-only mount as root")
        script = (f"mount --bind {store} {store} && mount -o remount,bind,ro {store} {store} || exit 77; "
                  + " ".join(f"'{part}'" for part in kebench))
        command = ["unshare", "-m", "sh", "-c", script]
    else:
        store.chmod(0o555)
        command = kebench
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode == 77:
        pytest.skip("cannot make a read-only mount here")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "is not writable" in lines[0] and "Traceback" not in done.stderr
    assert elapsed < 30  # interpreter start-up included; no Ray, no model
    assert not any(store.iterdir())


def test_end_to_end_hangs_fail_fast(tmp_path):
    """The two hangs as real commands: exit 2, one line, well before any timeout (start-up included)."""
    for extra, fragment in ((["--ray-address", "127.0.0.1:1"], "no Ray cluster answers there"),
                            ([], "resources.num_cpus=64")):
        grid = _grid(tmp_path, resources={"num_cpus": 64}) if not extra else _grid(tmp_path)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "grid", "--grid", grid, "--quiet", *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        elapsed = time.perf_counter() - started
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], done.stderr
        assert elapsed < 30, f"{elapsed:.1f} s"


@pytest.mark.needs_data("wikidata-counterfact")
def test_truncated_gzip_is_found_by_the_loader(tmp_path):
    from benchmarks.registry import select_cases
    from kebench.core.errors import KebenchError

    with pytest.raises(KebenchError, match=r"wiki_counterfact_test_cf\.json\.gz: truncated or damaged gzip"):
        select_cases("wikidata-counterfact", "test", 1, 0, _truncated_gz(tmp_path))
    with gzip.open(tmp_path / "data" / CF_TEST, "wb") as handle:  # a whole file loads again
        handle.write(gzip.decompress((DATA / CF_TEST).read_bytes()))
    assert select_cases("wikidata-counterfact", "test", 1, 0, str(tmp_path / "data")).n == 1
