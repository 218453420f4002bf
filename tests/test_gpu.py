"""The GPU path (issue 31): every method on CUDA, restore bit-exact on the device, case-parallel = one by one.

Skipped with a reason where ``torch.cuda.is_available()`` is false (here); ``bench/gpu_check.sh`` runs them on
a lent GPU.  The module runs on a bare GPU machine, one with only PyTorch, transformers, peft, safetensors,
pyyaml, numpy and pytest installed: it imports nothing else at import time (kebench's methods, benchmarks and
scenario logic need nothing more; ``test_this_module_imports_only_the_bare_gpu_packages`` checks it here), and
the one test that needs Ray, DuckDB and pyarrow (a grid asking for ``num_gpus``) skips where they are missing.

* every method edits the tiny model on CUDA in float32, moves the target, and ``restore`` returns every
  parameter and the probe outputs bit for bit;
* the same under ``dtype: auto`` on a bfloat16 checkpoint (a ``path:`` folder saved in bfloat16): the model
  runs in bfloat16 and ROME/MEMIT/FT's edited modules in float32 (``PrecisionIsland``);
* case-parallel single editing equals one-by-one editing on the device: same steps, scores to 2 decimals (the
  float32 promise on a CPU, ``tests/test_parallel_cases.py``);
* a grid with ``resources.num_gpus: 1`` schedules its cells on the GPU.

ROME, MEMIT and AlphaEdit need second-moment statistics from the ``shared-offline`` corpus; where its files
are missing (a bare machine without the benchmark data) those three are skipped with that reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what a bare GPU machine has, and what this module must therefore not need at import time
BARE = ("torch", "transformers", "peft", "safetensors", "yaml", "numpy")
HEAVY = ("ray", "duckdb", "pyarrow", "matplotlib", "rich", "optuna", "pandas")

for _package in BARE:
    pytest.importorskip(_package, reason=f"the GPU tests need {_package} (a bare GPU machine has it)")

import torch  # noqa: E402

try:
    from benchmarks.evaluate import compute_pre_edit
    from benchmarks.metrics import encode
    from benchmarks.registry import select_cases
    from kebench.core.errors import KebenchError
    from kebench.core.models import load_model, with_precision
    from methods.base import get_method, method_names
    from methods.hparams import load_hparams
    from orchestrator.grid import precision_for
    from orchestrator.scenarios import PROBE_TEXTS, Scenario, plain_logits, run_scenario
except ImportError as exc:  # a package kebench needs that this machine lacks: say which
    pytest.skip(f"kebench cannot be imported here: {exc}", allow_module_level=True)

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here: the GPU path runs on a lent GPU "
                                                 "(bench/gpu_check.sh)")
#: kebench's own methods (not the throw-away editors other test modules register)
METHODS = [name for name in method_names() if get_method(name).__module__.startswith("methods.")]
NEEDS_STATISTICS = ("rome", "memit", "alphaedit")
#: a looser stopping rule and a smaller step than the tiny YAML's, so cases stop at different steps (as on a CPU)
STAGGERED = {"baft": {"early_stop_loss": 0.5, "lr": 0.02}, "reft": {"early_stop_loss": 0.5, "lr": 0.02},
             "ft-l": {"early_stop_loss": 2.0, "lr": 0.05}, "ft-m": {"early_stop_loss": 0.5, "lr": 0.02}}


def test_this_module_imports_only_the_bare_gpu_packages():
    """Importing this module (kebench's methods, benchmarks, models, grid checks and scenario logic) loads none of
    Ray, DuckDB, pyarrow, matplotlib, rich, optuna or pandas, so it runs where only the bare packages are."""
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import test_gpu; "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT / "tests"), str(ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_timing_script_writes_what_kebench_plan_reads(tmp_path, monkeypatch):
    """``bench/gpu_timing.py`` on the unit-test shape on a CPU: the records ``kebench plan --edit-speed`` reads."""
    for package in ("duckdb", "pyarrow"):  # kebench plan's (not on a bare GPU machine)
        pytest.importorskip(package, reason=f"kebench plan needs {package}")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_timing
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from orchestrator.plan import edit_speed_measurements

    out = tmp_path / "speed.json"
    assert gpu_timing.main(["--shape", "tiny", "--device", "cpu", "--methods", "rome", "--n", "1",
                            "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["model"], r["method"], r["weights"], r["dtype"]) for r in records] == [
        ("tiny-random-llama", "rome", "random", "float32")]
    (measured,) = edit_speed_measurements(out)
    assert (measured.model, measured.method, measured.device) == ("tiny-random-llama", "rome", "cpu")


# --------------------------------------------------------------------------- on the device

def _needs(method: str) -> None:
    """Skip ROME/MEMIT/AlphaEdit where the statistics corpus is missing (a bare machine without the data)."""
    if method in NEEDS_STATISTICS:
        from methods.stats import offline_pool

        try:
            offline_pool()
        except KebenchError as exc:
            pytest.skip(f"{method} needs the shared-offline statistics corpus, missing here: {exc}")


def _probe(logits_fn, lm) -> torch.Tensor:
    batch = encode(lm.tokenizer, [(text, "X") for text in PROBE_TEXTS], lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        return logits_fn(batch)


def _target_logprob(logits_fn, lm, case) -> float:
    batch = encode(lm.tokenizer, [(case.prompt, case.target_new)], lm.pad_token_id).to(lm.device)
    with torch.no_grad():
        logits = logits_fn(batch)
    predicted_at = batch.answer_mask()[:, 1:]
    targets = batch.input_ids[:, 1:][predicted_at]
    return -float(torch.nn.functional.cross_entropy(logits[:, :-1][predicted_at].float(), targets))


def _edit_and_restore(lm, method: str, model: str) -> None:
    """One edit: the target's log-probability rises (``unedited``: unchanged), the outputs stay finite, and
    restore returns every parameter and the probe outputs bit for bit, on the device."""
    case = select_cases("zsre", "dev", n=1).cases[0]
    original = {name: tensor.clone() for name, tensor in lm.model.state_dict().items()}
    probes = _probe(plain_logits(lm), lm)
    before = _target_logprob(plain_logits(lm), lm, case)
    torch.manual_seed(0)
    editor = get_method(method)(lm, load_hparams(method, model, "single"), seed=0)
    try:
        editor.apply([case])
        after = _target_logprob(editor.logits, lm, case)
        assert torch.isfinite(_probe(editor.logits, lm)).all(), f"{method}: non-finite outputs after the edit"
    finally:
        editor.restore()
    if method == "unedited":
        assert after == before
    else:
        assert after > before, f"{method}: target log-prob {before:.4f} -> {after:.4f} on {lm.device}"
    state = lm.model.state_dict()
    assert all(torch.equal(state[name], original[name]) for name in original), f"{method}: weights changed"
    assert all(tensor.device.type == "cuda" for tensor in state.values())
    assert torch.equal(_probe(plain_logits(lm), lm), probes), f"{method}: outputs changed after restore"


@pytest.fixture(scope="module")
def cuda_lm():
    return load_model("tiny-random-llama", device="cuda")


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_every_method_edits_on_cuda_in_float32_and_restores_bit_exact(cuda_lm, method):
    _needs(method)
    _edit_and_restore(cuda_lm, method, "tiny-random-llama")


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory) -> str:
    """The tiny model saved as a bfloat16 checkpoint (``path:``), as the paper's models are half-precision."""
    folder = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    lm = load_model("tiny-random-llama", device="cpu")
    lm.model.to(torch.bfloat16).save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return f"path:{folder}"


@needs_cuda
@pytest.mark.parametrize("method", METHODS)
def test_every_method_under_dtype_auto_on_a_bfloat16_checkpoint(bfloat16_checkpoint, method):
    _needs(method)
    precision = precision_for("auto", method, bfloat16_checkpoint, accelerator=True)
    assert precision.model == "bfloat16"
    assert (precision.edited == "float32") == get_method(method).edits_weights  # ROME/MEMIT/FT: float32 islands
    lm = with_precision(load_model(bfloat16_checkpoint, device="cuda", dtype=precision.torch_dtype), precision)
    _edit_and_restore(lm, method, "tiny-random-llama")


@needs_cuda
@pytest.mark.parametrize("method", sorted(STAGGERED))
def test_case_parallel_equals_one_by_one_on_cuda(cuda_lm, method):
    targets = ["Oslo", "Lima Peru", "Quito", "Riga Latvia", "Bern", "Kyiv Ukraine"]
    cases = [dataclasses.replace(case, case_id=f"p{i}", target_new=targets[i])
             for i, case in enumerate(select_cases("zsre", "dev", n=6).cases)]
    hparams = load_hparams(method, "tiny-random-llama", "single", STAGGERED[method])
    pre = compute_pre_edit(plain_logits(cuda_lm), cuda_lm.tokenizer, cuda_lm.pad_token_id, cuda_lm.device, cases)

    def by_case(parallel: int) -> dict:
        result = run_scenario(cuda_lm, method, hparams, cases, Scenario("single", parallel_cases=parallel), 0, pre=pre)
        return {c.case_id: ({m: round(v, 2) for m, v in c.scores.as_dict().items()}, c.steps) for c in result.cases}

    assert by_case(3) == by_case(1)


@needs_cuda
@pytest.mark.timeout(900)
def test_a_grid_asking_for_a_gpu_runs_its_cells_on_it(tmp_path):
    for package in ("ray", "duckdb", "pyarrow"):
        pytest.importorskip(package, reason=f"a grid needs {package}")
    import duckdb
    import ray

    from orchestrator.grid import parse_grid
    from orchestrator.ray_session import local_ray_loopback
    from orchestrator.runner import run_grid

    grid = parse_grid({"name": "gpu", "resources": {"num_cpus": 1, "num_gpus": 1}, "models": ["tiny-random-llama"],
                       "benchmarks": [{"name": "zsre", "split": "dev", "n": 2}], "scenarios": [{"kind": "single"}],
                       "methods": [{"name": "baft", "hparams": {"max_steps": 5}}]}, "gpu.yaml")
    local_ray_loopback()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        report = run_grid(grid, tmp_path / "store")
    finally:
        ray.shutdown()
    assert (report.ok, report.failed) == (1, 0), report.failures
    device = duckdb.connect().execute(f"SELECT device FROM read_parquet('{tmp_path}/store/cells/**/*.parquet', "
                                      "hive_partitioning=true)").fetchone()[0]
    assert device.startswith("cuda") and "ray GPU ids 0" in device
