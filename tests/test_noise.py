"""``kebench noise``: one cell re-run under ISA levels, thread counts and seeds, each metric's spread reported.

The end-to-end test is also the record of what ``native`` numerics do on this machine: the tiny-model
continual cell under ATen/MKL/oneDNN at AVX-512 and at AVX2 gives different numbers (test_numerics.py shows
``portable`` giving one set of rows under both).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kebench.core.errors import KebenchError
from orchestrator.cli import main
from orchestrator.noise import Perturbation, Run, parse_list, perturbations, report_markdown, spreads, summarize_run

CELL = ["--model", "tiny-random-llama", "--method", "baft", "--scenario", "continual", "--T", "2", "--n", "4"]


def test_one_axis_at_a_time_from_the_baseline() -> None:
    runs = perturbations(["native", "avx2"], [1, 2], [0, 1, 2])
    assert [(p.axis, p.isa, p.threads, p.seed) for p in runs] == [
        ("baseline", "native", 1, 0), ("isa", "avx2", 1, 0), ("threads", "native", 2, 0),
        ("seed", "native", 1, 1), ("seed", "native", 1, 2)]
    env = runs[1].env({"PATH": "/bin", "ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "8"})
    assert env == {"PATH": "/bin", "KEBENCH_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    portable = Perturbation("isa", "portable", 2, 0)
    assert portable.numerics == "portable" and portable.env({})["MKL_CBWR"] == "COMPATIBLE"


def test_spreads_by_hand() -> None:
    def run(axis: str, rel: float, loc: float) -> Run:
        rows = [{"case_id": "a", "protocol": "teacher_forced", "rel": rel, "loc": loc, "seconds": 1.0,
                 "hardware": {"isa": "AVX2"}}]
        return summarize_run(Perturbation(axis, "native", 1, 0), rows)

    runs = [run("baseline", 0.5, 1.0), run("seed", 0.7, 1.0), run("seed", 0.6, 1.0), run("threads", 0.4, 0.8)]
    by_key = {(s.axis, s.metric): s for s in spreads(runs)}
    seed_rel = by_key[("seed", "rel")]
    assert seed_rel.values == (0.5, 0.7, 0.6) and seed_rel.spread == pytest.approx(0.2)
    assert seed_rel.sd == pytest.approx(0.1)  # sample sd of 0.5, 0.7, 0.6
    assert by_key[("threads", "avg")].values == pytest.approx((0.75, 0.6)) and by_key[("seed", "loc")].spread == 0.0
    assert by_key[("all", "rel")].values == (0.5, 0.7, 0.6, 0.4) and ("isa", "rel") not in by_key
    text = report_markdown("cell", runs)
    assert "| seed | 3 | teacher_forced | Rel. | 0.5000 | 0.7000 | 0.2000 | 0.1000 |" in text


def test_bad_arguments_are_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["noise", *CELL, "--isa", "avx2,sse9"]) == 2
    assert "--isa: unknown value 'sse9'" in capsys.readouterr().err
    assert main(["noise", *CELL, "--seed", "3"]) == 2
    assert "--seed is set per run (use --seeds, --isa); leave it out" in capsys.readouterr().err
    assert main(["noise", *CELL, "--threads", "1,1"]) == 2
    assert "--threads: '1' appears twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["noise", *CELL, "--bogus"])  # kebench edit's own parser refuses it
    with pytest.raises(SystemExit):
        main(["edit", *CELL, "--isa", "avx2"])  # only noise passes arguments on
    with pytest.raises(KebenchError, match="--seeds: name at least one value"):
        parse_list(" ,", "--seeds", int)


def test_native_isa_levels_spread_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "noise.json"
    assert main(["noise", *CELL, "--isa", "avx512,avx2", "--threads", "1", "--seeds", "0", "--jobs", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## Numeric noise: baft · tiny-random-llama · zsre/test · continual(T=2, B=1) · n=4" in text
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["axis"], r["isa"], r["hardware"]["isa"]) for r in runs][1][:2] == ("isa", "avx2")
    assert runs[1]["hardware"]["isa"] == "AVX2" and runs[1]["hardware"]["env"]["MKL_CBWR"] == "AVX2"
    isa = {s["metric"]: s for s in report["spreads"] if s["axis"] == "isa"}
    assert set(isa) >= {"rel", "gen", "loc", "por", "avg"} and all(len(s["values"]) == 2 for s in isa.values())
    if runs[0]["hardware"]["isa"] == "AVX512":  # a CPU with AVX-512: native numbers move with the level
        assert max(s["spread"] for s in isa.values()) > 0, "native numerics happened to agree across ISA levels"
    else:  # the CPU lacks AVX-512: both runs dispatched to the same level, and the report says so
        assert "this CPU lacks it" in text
