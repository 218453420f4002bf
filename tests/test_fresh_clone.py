"""A checkout with no ``../shared`` beside it, no ``$KEBENCH_DATA`` and an empty fetch cache (any machine but
ours): the demo's benchmark selection (``grids/smoke.yaml``: zsre test, n = 20) comes from the embedded
file, and its first cases run on the tiny model; ``kebench data status`` says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kebench", "benchmarks", "methods", "orchestrator", "results", "grids")

SCRIPT = """
import json, sys
from orchestrator.cli import main
from orchestrator.grid import load_grid
from benchmarks.registry import select_cases
from benchmarks.data import locate, resolve_data_dir

bench = load_grid("grids/smoke.yaml").benchmarks[0]
selection = select_cases(bench.name, bench.split, bench.n, bench.offset)
found = locate(resolve_data_dir(), "zsre/zsre_mend_eval_portability_gpt4.json")
# The first 4 of those cases on the tiny model (the 20 take longer on a busy machine, and read the same file).
code = main(["edit", "--model", "tiny-random-llama", "--benchmark", bench.name, "--split", bench.split,
             "--n", "4", "--method", "unedited", "--quiet"])
print(json.dumps({"code": code, "n": selection.n, "origin": found.origin, "path": str(found.path)}))
"""


def test_the_demo_selection_runs_from_the_embedded_file_in_a_bare_clone(tmp_path):
    clone = tmp_path / "clone"
    for name in PACKAGES:
        shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", clone)
    assert not (tmp_path / "shared").exists()
    env = {key: value for key, value in os.environ.items() if key not in {"KEBENCH_DATA", "PYTHONPATH"}}
    env.update(PYTHONPATH=str(clone), KEBENCH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=clone, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and report["n"] == 20 and report["origin"] == "embedded"
    assert report["path"].startswith(str(clone / "benchmarks" / "embedded"))
    assert "zsre/test" in result.stdout and "n=4" in result.stdout  # the edit's table was printed

    status = subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; raise SystemExit(main())",
                             "data", "status", "--benchmark", "zsre"], cwd=clone, env=env, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0
    assert "data directory: (none: the fetch cache)" in status.stdout
    assert any("verified" in line and "embedded:" in line for line in status.stdout.splitlines())
    assert any("missing" in line and "kebench data fetch --benchmark zsre" in line for line in status.stdout.splitlines())
