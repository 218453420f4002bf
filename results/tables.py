"""The tables facade: ``render(store, table, fmt)`` for the command line and the tests.

Where things live: DuckDB views in ``results.views``, the table registry and model in
``results.registry``, the paper's table shapes in ``results.shapes``, the four formats in
``results.render``.  A new table is one ``@register_table`` function anywhere.
"""

from __future__ import annotations

from results.registry import get_table, register_table, table_names
from results.render import FORMATS, RENDERERS, build_table, render
from results.views import connect

__all__ = ["FORMATS", "RENDERERS", "build_table", "connect", "get_table", "register_table", "render", "table_names"]
