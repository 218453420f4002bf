"""kebench's public API: the one name plug-in authors import.

    from kebench import Editor, EditStats, EditCase, register_method, register_benchmark, register_model
    from kebench import ScenarioKind, Stream, register_scenario        # a scenario kind
    from kebench import ScoringProtocol, register_protocol             # a scoring protocol

Names are resolved on first use (PEP 562), so ``import kebench.core.errors`` from inside kebench's own
layers never drags the method or benchmark registries in with it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    # base layer
    "KebenchError": "kebench.core.errors",
    "LoadedModel": "kebench.core.models",
    "ModelInfo": "kebench.core.models",
    "register_model": "kebench.core.models",
    "load_model": "kebench.core.models",
    "Metric": "kebench.core.metrics",
    "register_metric": "kebench.core.metrics",
    "ScenarioKind": "kebench.core.scenarios",
    "ScenarioParam": "kebench.core.scenarios",
    "TableShape": "kebench.core.scenarios",
    "register_scenario": "kebench.core.scenarios",
    # benchmarks
    "EditCase": "benchmarks.case",
    "PromptAnswer": "benchmarks.case",
    "register_benchmark": "benchmarks.registry",
    "TFBatch": "benchmarks.metrics",
    "encode": "benchmarks.metrics",
    "prefix_causal": "benchmarks.metrics",
    "ScoringProtocol": "benchmarks.protocols",
    "register_protocol": "benchmarks.protocols",
    # methods
    "Editor": "methods.base",
    "EditStats": "methods.base",
    "NonFiniteError": "methods.base",
    "register_method": "methods.base",
    # orchestrator: what a scenario kind's stream logic returns
    "Stream": "orchestrator.scenarios",
    # results
    "register_table": "results.registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kebench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
