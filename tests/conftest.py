from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.needs_data("piqa", ...)`` (data groups or manifest file names): only the ZsRE file ships in
    the package, so on a checkout without ../shared/data, $KEBENCH_DATA or a fetch cache these tests skip,
    naming the command that fetches what they read, instead of failing on a missing file."""
    needs = tuple(need for marker in item.iter_markers("needs_data") for need in marker.args)
    if not needs:
        return
    from benchmarks.manifest import entry_for
    from helpers import missing_data

    missing = missing_data(needs)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        groups = dict.fromkeys(entry_for(name).used_by[0] for name in missing)
        pytest.skip(f"benchmark data {missing[0]} not found{more}; "
                    f"`kebench data fetch{''.join(f' --benchmark {group}' for group in groups)}` gets it")


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
