"""Numbers that hold on another machine (issue 30): the hardware record in every row, ``portable`` numerics that
give identical rows whatever ISA level the machine would dispatch to, and what ``native`` does instead.

The subprocess tests run ``kebench edit`` on the tiny model (continual T = 2, n = 4, one torch thread), two
processes at a time.  Measured on this machine (AMD EPYC, torch 2.13.0+cpu, AVX-512): under ``native`` the
same cell with ``ATEN_CPU_CAPABILITY=avx512`` and ``=avx2`` gives different rows (Rel 0.23 vs 0.42 over the
four cases: rounding flips the early stop and the stream diverges); under ``portable`` both give one row set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kebench.core.errors import KebenchError
from kebench.core import numerics
from orchestrator.grid import expand, parse_grid

ROOT = Path(__file__).resolve().parents[1]
CELL = ["--model", "tiny-random-llama", "--method", "baft", "--scenario", "continual", "--T", "2", "--n", "4"]


def _edit_processes(tmp_path: Path, runs: dict[str, tuple[str, str]]) -> dict[str, list[dict]]:
    """``kebench edit`` once per ``name: (numerics, preset ATEN_CPU_CAPABILITY)``, all at once; the JSON rows."""
    env = {key: value for key, value in os.environ.items() if key not in numerics.NUMERICS_ENV}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    started = {}
    for name, (mode, preset) in runs.items():
        out = tmp_path / f"{name}.jsonl"
        started[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "edit", *CELL, "--numerics", mode, "--out", str(out), "--quiet"],
            cwd=ROOT, env={**env, "ATEN_CPU_CAPABILITY": preset}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    rows = {}
    for name, (out, process) in started.items():
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
        assert f"note: computed on {numerics.cpu_model()}" in stdout.replace("\n", " ")
    return rows


def _numbers(rows: list[dict]) -> list[dict]:
    """The rows without their timing (the only field that may differ between identical computations)."""
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def test_portable_rows_are_identical_whatever_isa_level_the_process_was_given(tmp_path: Path) -> None:
    rows = _edit_processes(tmp_path, {"avx512": ("portable", "avx512"), "avx2": ("portable", "avx2")})
    assert len(rows["avx512"]) == 4 and _numbers(rows["avx512"]) == _numbers(rows["avx2"])
    for row in rows["avx512"]:  # portable overrode the preset level, and every row says so
        hardware = row["hardware"]
        assert hardware["isa"] == "AVX2" and hardware["numerics"] == "portable" and hardware["threads"] == 1
        assert hardware["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and hardware["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert hardware["cpu"] == numerics.cpu_model() and hardware["torch"] and hardware["onednn"]
        if hardware["blas"] == "mkl":  # MKL's own report of the branch it runs
            assert hardware["mkl_cnr"] == "COMPATIBLE" and hardware["mkl"]


def test_numerics_key_of_a_grid_and_the_cell_id() -> None:
    grid = {"name": "n", "models": ["tiny-random-llama"], "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}],
            "scenarios": [{"kind": "single"}], "methods": ["baft"]}
    (default,) = expand(parse_grid(grid, "n.yaml"))
    (native,) = expand(parse_grid({**grid, "numerics": "native"}, "n.yaml"))
    (portable,) = expand(parse_grid({**grid, "numerics": "portable"}, "n.yaml"))
    assert default.cell_id == {"native": native, "portable": portable}[numerics.DEFAULT_NUMERICS].cell_id
    assert portable.cell_id != native.cell_id and portable.identity()["numerics"] == "portable"
    assert "numerics" not in native.identity() and portable.numerics == "portable"  # no stored (native) id moves
    assert parse_grid({**grid, "numerics": "portable"}, "n.yaml").to_dict()["numerics"] == "portable"
    with pytest.raises(KebenchError, match=r"^n\.yaml: numerics must be one of native, portable, got 'fast'$"):
        parse_grid({**grid, "numerics": "fast"}, "n.yaml")


def test_environment_of_each_setting() -> None:
    assert numerics.numerics_env("native") == {"KEBENCH_NUMERICS": "native"}
    assert numerics.numerics_env("portable") == {"KEBENCH_NUMERICS": "portable", "ATEN_CPU_CAPABILITY": "avx2",
                                                 "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert numerics.isa_env("avx512") == {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512",
                                          "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    assert numerics.isa_env("native") == {}
    with pytest.raises(KebenchError, match="--isa: unknown level 'sse9'"):
        numerics.isa_env("sse9")


def test_a_process_never_computes_under_numerics_it_was_not_started_with(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEBENCH_NUMERICS", raising=False)
    numerics.verify_numerics("native")
    with pytest.raises(KebenchError, match="numerics portable requested but this process was started under native"):
        numerics.verify_numerics("portable")
    # this test process loaded torch natively: saying "portable" afterwards does not make it so
    monkeypatch.setenv("KEBENCH_NUMERICS", "portable")
    if numerics.hardware_record()["isa"] != "AVX2" or numerics.mkl_branch() not in (None, "COMPATIBLE"):
        with pytest.raises(KebenchError, match="^numerics portable did not take effect: "):
            numerics.verify_numerics("portable")


def test_hardware_record_and_label_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    record = numerics.hardware_record()
    assert record["cpu"] == numerics.cpu_model() and record["isa"] == torch.backends.cpu.get_cpu_capability()
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads() and "gpu" not in record
    json.dumps(record)  # stored as JSON
    label = numerics.hardware_label(record)
    assert label.startswith(f"{record['cpu']} · torch {torch.__version__} · ISA {record['isa']}")
    assert numerics.hardware_label(None) == "not recorded"
    # the GPU path, as a CUDA machine would take it (torch.cuda answers faked here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    gpu = numerics.hardware_record()["gpu"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3" and gpu["capability"] == "9.0" and gpu["tf32_matmul"] is False
    assert {"driver", "cuda", "cudnn", "float32_matmul_precision", "deterministic_algorithms",
            "cublas_workspace_config"} <= set(gpu)
    assert "GPU NVIDIA H100 80GB HBM3 (driver " in numerics.hardware_label({**record, "gpu": gpu})


def test_portable_too_late_is_one_line_and_leaves_the_callers_environment(capsys: pytest.CaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``main(argv)`` inside a process whose torch already dispatched natively cannot make it portable: one line,
    exit 2, and the calling process's environment as it was."""
    import torch

    from orchestrator.cli import main

    monkeypatch.delenv("KEBENCH_NUMERICS", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    torch.ones(3).exp()  # ATen has dispatched: its level is fixed for this process
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and numerics.mkl_branch() in (None, "COMPATIBLE"):
        pytest.skip("this process already runs the portable path")
    assert main(["edit", *CELL, "--numerics", "portable"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kebench: error: numerics portable did not take effect: ") and err.count("\n") == 1
    assert "KEBENCH_NUMERICS" not in os.environ and "ATEN_CPU_CAPABILITY" not in os.environ


def test_edit_refuses_an_unknown_numerics_value(capsys: pytest.CaptureFixture) -> None:
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["edit", *CELL, "--numerics", "fast"])
    assert exit_.value.code == 2 and "--numerics: invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.ray
def test_grid_workers_compute_under_the_grids_numerics(tmp_path: Path) -> None:
    """Ray workers get the numerics through their runtime environment, before they import torch: a portable grid
    run from a driver whose own environment asks for AVX-512 stores AVX2 rows that say so."""
    store = tmp_path / "store"
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "store": str(store), "resources": {"num_cpus": 1}, "models": ["tiny-random-llama"],
        "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}], "scenarios": [{"kind": "single"}],
        "methods": [{"name": "baft", "hparams": {"max_steps": 3}}], "numerics": "portable"}))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TOKENIZERS_PARALLELISM": "false",
           "ATEN_CPU_CAPABILITY": "avx512"}
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "grid", "--grid", str(grid), "--quiet",
                           "--num-cpus", "1", "--tables", "single"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    from results.views import connect, records

    with connect(store) as con:
        (row,) = records(con, "SELECT status, hardware, numerics, notes FROM cells_latest")
    hardware = json.loads(row["hardware"])
    assert row["status"] == "ok" and row["numerics"] == "portable" == hardware["numerics"]
    assert hardware["isa"] == "AVX2" and hardware["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and hardware["threads"] == 1
    assert json.loads(row["notes"])[0].startswith("model ")
    assert "computed on " in done.stdout and "ISA AVX2" in done.stdout and "portable numerics" in done.stdout
