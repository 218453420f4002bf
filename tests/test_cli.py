"""``kebench edit``: a run writes JSON lines; bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_edit_writes_one_json_object_per_case(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    code, stdout, _ = _run(["edit", "--model", "tiny-random-llama", "--method", "reft", "--scenario", "continual",
                            "--T", "2", "--n", "4", "--split", "dev", "--set", "max_steps=2", "--quiet", "--out", str(out)],
                           capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and [r["stream"] for r in rows] == [0, 0, 1, 1]
    for row in rows:
        assert {"case_id", "rel", "gen", "loc", "por", "stream", "seconds"} <= set(row)
        assert 0.0 <= row["rel"] <= 1.0 and row["seconds"] > 0
    assert "Rel." in stdout and "Avg." in stdout and "reft" in stdout


@pytest.mark.needs_data("piqa")
def test_edit_prints_one_row_per_protocol_and_the_downstream_check(capsys):
    code, stdout, _ = _run(["edit", "--model", "tiny-random-llama", "--method", "grace", "--n", "1", "--quiet",
                            "--set", "n_iter=2"], capsys)
    assert code == 0 and "grace [generation]" in stdout and "grace [teacher_forced]" in stdout and "n=1" in stdout
    code, stdout, _ = _run(["edit", "--model", "tiny-random-llama", "--method", "reft", "--scenario", "continual",
                            "--T", "2", "--n", "2", "--set", "max_steps=1", "--quiet", "--downstream", "piqa",
                            "--downstream-n", "4"], capsys)
    assert code == 0 and "downstream piqa (4 items): unedited" in stdout


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["edit", "--method", "nope", "--model", "tiny-random-llama"], "unknown method 'nope'"),
        (["edit", "--method", "baft", "--model", "gpt-9"], "unknown model 'gpt-9'"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--benchmark", "nope"], "unknown benchmark 'nope'"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--scenario", "continual", "--T", "0"], "--T"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--n", "100000"], "exceeds"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--set", "rnak=3", "--n", "1"], "unknown hyperparameter 'rnak'"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--scenario", "magic"], "unknown scenario 'magic'"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--scenario", "continual", "--T", "2",
          "--downstream", "hellaswag"], "unknown downstream check 'hellaswag'"),
        (["edit", "--method", "baft", "--model", "tiny-random-llama", "--downstream", "piqa"],
         "use a continual, batched or lifelong scenario"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_missing_data_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))  # an empty fetch cache
    code, _, err = _run(["edit", "--method", "baft", "--model", "tiny-random-llama", "--benchmark", "zsre-knowedit",
                         "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "knowedit/zsre_test_all.json not found in" in err and len(err.strip().splitlines()) == 1
    assert "`kebench data fetch --benchmark zsre-knowedit`" in err
