"""The four formats a table (``results.registry.Table``) renders in: Markdown, LaTeX, CSV and HTML."""

from __future__ import annotations

import csv
import html
import io
from typing import Callable


from results.registry import FAILED, NOT_RUN, Block, Cell, Table

FORMATS = ("md", "latex", "csv", "html")


def md_text(text: object) -> str:
    """Text from the store (prompts, labels, errors, notes, model paths) made inert in Markdown: Markdown
    passes raw HTML through, so ``<script>`` in a prompt would run where the page is rendered; ``&<>``
    become entities, as the HTML page escapes them (quotes are left alone: they are harmless here)."""
    return html.escape(str(text), quote=False)


def _flat_header(block: Block) -> list[str]:
    return [f"{group.name} {column}" for group in block.groups for column in group.columns]


def _legend(table: Table) -> list[str]:
    texts = {cell.text for block in table.blocks for _, cells in block.rows for cell in cells}
    legend = []
    if any(cell.sd for block in table.blocks for _, cells in block.rows for cell in cells):
        legend.append("a ± b: mean over seeds ± sd over seeds (of the per-seed means)")
    if NOT_RUN in texts:
        legend.append(f"{NOT_RUN}: not run (or metric not measured)")
    if FAILED in texts:
        legend.append(f"{FAILED}: latest attempt failed")
    return ["; ".join(legend)] if legend else []


def _markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    marks = {"best": "**{}**", "second": "<u>{}</u>", "": "{}"}
    out = [f"## {md_text(table.title)}", ""]
    for block in table.blocks:
        if block.title:
            out += [f"### {md_text(block.title)}", ""]
        header = ["Method"] + [md_text(text) for text in _flat_header(block)]
        out += [line(header), "| --- |" + " ---: |" * (len(header) - 1)]
        out += [line([md_text(label)] + [marks[cell.mark].format(md_text(cell.text)) + _sd_suffix(cell, md_text)
                                          for cell in cells])
                for label, cells in block.rows]
        out.append("")
    notes = table.notes + _legend(table)
    out += ["Notes:", ""] + [f"- {md_text(note)}" for note in notes] if notes else []
    return "\n".join(out).rstrip()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  NOT_RUN: "--", FAILED: r"$\times$", "·": r"$\cdot$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex(table: Table) -> str:
    """booktabs tabulars (\\toprule, \\cmidrule), one per block, as in the paper's tables."""
    marks = {"best": r"\textbf{%s}", "second": r"\underline{%s}", "": "%s"}
    out = [f"% {table.title}"]
    for block in table.blocks:
        widths = [len(group.columns) for group in block.groups]
        out += ["\\begin{tabular}{l" + "".join("r" * width for width in widths) + "}", r"\toprule"]
        if block.title:
            out += [rf"\multicolumn{{{1 + sum(widths)}}}{{c}}{{{_tex(block.title)}}} \\", r"\midrule"]
        out.append(" & ".join([""] + [rf"\multicolumn{{{w}}}{{c}}{{{_tex(g.name)}}}"
                                       for g, w in zip(block.groups, widths)]) + r" \\")
        starts = [2 + sum(widths[:index]) for index in range(len(widths))]
        out.append("".join(rf"\cmidrule(lr){{{s}-{s + w - 1}}}" for s, w in zip(starts, widths)))
        out.append(" & ".join(["Method"] + [_tex(c) for g in block.groups for c in g.columns]) + r" \\")
        out.append(r"\midrule")
        out += [" & ".join([_tex(label)] + [marks[c.mark] % _tex(c.text)
                                             + (rf" {{\scriptsize $\pm$ {_tex(c.sd)}}}" if c.sd else "") for c in cells])
                + r" \\" for label, cells in block.rows]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    out += [rf"\par\noindent{{\footnotesize Note: {_tex(note)}}}" for note in table.notes + _legend(table)]
    return "\n".join(out).rstrip()


def _html(table: Table) -> str:
    marks = {"best": "<b>{}</b>", "second": "<u>{}</u>", "": "{}"}
    esc = html.escape
    out = [f"<h2>{esc(table.title)}</h2>"]
    for block in table.blocks:
        out.append("<table>")
        if block.title:
            out.append(f"<caption>{esc(block.title)}</caption>")
        out.append("<thead>")
        out.append('<tr><th rowspan="2">Method</th>'
                   + "".join(f'<th colspan="{len(g.columns)}">{esc(g.name)}</th>' for g in block.groups) + "</tr>")
        out.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for g in block.groups for c in g.columns) + "</tr>")
        out.append("</thead>")
        out.append("<tbody>")
        for label, cells in block.rows:
            tds = "".join(f"<td>{marks[c.mark].format(esc(c.text))}{_sd_suffix(c, esc, '<small>', '</small>')}</td>"
                          for c in cells)
            out.append(f"<tr><td>{esc(label)}</td>{tds}</tr>")
        out += ["</tbody>", "</table>"]
    out += [f'<p class="note">Note: {esc(note)}</p>' for note in table.notes + _legend(table)]
    return "\n".join(out)


def _csv(table: Table) -> str:
    """One CSV for all blocks: the block's key columns, the method, then "<group> <metric>" columns.

    Notes follow as ``# `` comment lines (pandas: ``read_csv(..., comment="#")``).  A column some of whose cells
    have a seed sd is followed by "<column> sd" (numbers stay numbers).
    """
    key_names = list(table.blocks[0].keys)
    with_sd = {name for block in table.blocks for _, cells in block.rows
               for name, cell in zip(_flat_header(block), cells) if cell.sd}
    columns: list[str] = []
    for block in table.blocks:
        for name in _flat_header(block):
            if name not in columns:
                columns += [name, f"{name} sd"] if name in with_sd else [name]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(key_names + ["method"] + columns)
    for block in table.blocks:
        for label, cells in block.rows:
            by_column = dict(zip(_flat_header(block), (cell.text for cell in cells)))
            by_column.update((f"{name} sd", cell.sd) for name, cell in zip(_flat_header(block), cells) if cell.sd)
            keys = [block.keys[name] for name in key_names]
            writer.writerow(keys + [label] + [by_column.get(column, "") for column in columns])
    buffer.writelines(f"# {note}\n" for note in table.notes)
    return buffer.getvalue().rstrip("\n")


def _sd_suffix(cell: Cell, escape: Callable[[str], str], before: str = "", after: str = "") -> str:
    return f" {before}± {escape(cell.sd)}{after}" if cell.sd else ""


RENDERERS: dict[str, Callable[[Table], str]] = {"md": _markdown, "latex": _latex, "csv": _csv, "html": _html}
