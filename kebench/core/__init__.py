"""kebench's base layer: what every other layer may import (errors, the model record and registry, the
metric registry, plug-in loading). It imports nothing from ``benchmarks``, ``methods``, ``orchestrator``
or ``results``."""
