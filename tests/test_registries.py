"""Open registries: a metric and a table registered from outside kebench reach the store and
``kebench table``; plug-ins that fail to import are reported by ``kebench list`` and the rest load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import put_cell
from kebench import register_metric, register_table
from kebench.core.metrics import metric_names
from orchestrator.cli import main
from results.registry import Block, Cell, Group
from results.views import records


def test_public_api_names() -> None:
    import kebench

    for name in ("Editor", "EditStats", "EditCase", "register_method", "register_benchmark", "register_model",
                 "register_metric", "register_table", "LoadedModel", "KebenchError"):
        assert getattr(kebench, name) is not None
    with pytest.raises(AttributeError):
        kebench.no_such_name  # noqa: B018


def test_a_new_metric_and_table_reach_the_store_and_kebench_table(tmp_path: Path, capsys) -> None:
    register_metric("fluency", "Flu.", description="test metric", order=50)
    assert "fluency" in metric_names()

    @register_table("fluency-by-method", "Fluency per method (a test table)")
    def fluency_table(con) -> list[Block]:
        rows = records(con, "SELECT label, avg(value) AS mean FROM cases_latest WHERE metric = 'fluency' GROUP BY label "
                            "ORDER BY label")
        if not rows:
            return []
        return [Block({}, "", [Group("all", ["Flu."])], [(r["label"], [Cell(f"{r['mean']:.2f}")]) for r in rows])]

    put_cell(tmp_path, "BaFT", 1, {"rel": [1.0, 0.5], "fluency": [0.25, 0.75]}, scenario="single")
    assert main(["table", "--store", str(tmp_path), "--table", "fluency-by-method"]) == 0
    assert "| BaFT | 0.50 |" in capsys.readouterr().out
    assert main(["table", "--store", str(tmp_path), "--table", "single"]) == 0
    single = capsys.readouterr().out
    assert "zsre Flu." in single and "| BaFT | 0.75 | 0.50 | **0.62** |" in single  # Rel, Flu., Avg. in metric order


def test_an_unregistered_metric_is_refused_by_the_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'metric' is 'bleu', not a registered metric"):
        put_cell(tmp_path, "BaFT", 1, {"bleu": [1.0]}, scenario="single")


def test_a_broken_plugin_is_reported_and_the_rest_load(tmp_path: Path) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[kebench.methods]\nghost = no_such_module_anywhere\n\n"
                                           "[kebench.benchmarks]\nghost-bench = also_missing:thing\n")
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "list"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    out = run.stdout
    assert "baft" in out and "zsre" in out  # everything else still loads
    assert ("failed:     plugin 'ghost = no_such_module_anywhere' from distribution 'broken-plugin' failed to load: "
            "ModuleNotFoundError: No module named 'no_such_module_anywhere'") in out
    assert "plugin 'ghost-bench = also_missing:thing' from distribution 'broken-plugin'" in out
    edit = subprocess.run([sys.executable, "-m", "orchestrator.cli", "edit", "--method", "ghost", "--model",
                           "tiny-random-llama"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert edit.returncode == 2 and "Traceback" not in edit.stderr
    assert "unknown method 'ghost'" in edit.stderr and "1 plug-in(s) failed to load" in edit.stderr
