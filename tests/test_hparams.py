"""Hyperparameter YAMLs: scenario blocks, coercion, and errors that name the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from methods.base import get_method
from methods.hparams import HPARAMS_DIR, load_hparams
from kebench.core.errors import KebenchError


def test_scenario_block_overrides_top_level():
    single = load_hparams("baft", "smollm2-135m", "single")
    batched = load_hparams("baft", "smollm2-135m", "batched")
    assert single.max_steps == 40 and batched.max_steps == 70
    assert batched.lr == pytest.approx(1e-4)
    assert single.layers == (8, 17, 22, 26)


def test_overrides_and_yaml_string_numbers(tmp_path: Path):
    path = tmp_path / "h.yaml"
    path.write_text("layers: [0]\nrank: 4\nlr: 5e-4\nmax_steps: 3\n")  # PyYAML reads 5e-4 as a string
    hp = load_hparams("reft", "tiny-random-llama", path=path, overrides={"rank": 8})
    assert hp.lr == pytest.approx(5e-4) and hp.rank == 8 and hp.layers == (0,)


@pytest.mark.parametrize(
    "text, message",
    [
        ("layers: [0]\nrank: 4\nlr: 1.0e-3\nmax_steps: 3\nrnak: 2\n", "unknown hyperparameter 'rnak'"),
        ("layers: [0]\nrank: true\nlr: 1.0e-3\nmax_steps: 3\n", "rank should be an integer"),
        ("layers: [0]\nrank: 4\nlr: fast\nmax_steps: 3\n", "lr should be a number"),
        ("layers: [0]\nrank: 4\nmax_steps: 3\n", "missing hyperparameter 'lr'"),
        ("layers: 0\nrank: 4\nlr: 1.0e-3\nmax_steps: 3\n", "layers should be a list"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("layers: [0]\nrank: 4\nlr: 1.0e-3\nmax_steps: 3\nbatched: 7\n", "'batched' should be a mapping"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(KebenchError) as error:
        load_hparams("reft", "tiny-random-llama", path=path)
    assert message in str(error.value) and "bad.yaml" in str(error.value)


def test_missing_yaml_for_a_model():
    with pytest.raises(KebenchError, match="no hyperparameters for method 'baft' on model 'gemma-1.1-7b-it'|is missing"):
        load_hparams("baft", "no-such-model")


def test_every_shipped_yaml_loads():
    paths = sorted(HPARAMS_DIR.rglob("*.yaml"))
    assert paths
    for path in paths:
        method, model = path.parent.name, path.stem
        get_method(method)
        for scenario in ("single", "continual", "batched"):
            load_hparams(method, model, scenario)
