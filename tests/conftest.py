from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_lm():
    from kebench.core.models import load_model

    return load_model("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def smol_lm():
    from kebench.core.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def zsre_dev():
    from benchmarks.registry import select_cases

    return select_cases("zsre", "dev", n=8).cases
