"""A Table as text: Markdown (best per column in bold), LaTeX (booktabs) and CSV (full precision)."""

from __future__ import annotations

import csv
import io

from orchestrator.reporting.layout import COLLAPSED_MARK, MISSING, Column, DeltaRow, Row, Table, TableCell, file_stem
from orchestrator.reporting.uncertainty import Delta


def _number(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def format_cell(cell: TableCell, digits: int = 2, pm: str = " ± ", mark: str = COLLAPSED_MARK) -> str:
    """`6.37 ± 0.12`, `6.37` (one seed), `6.37 ± 0.12 (n=2/3)` (seeds missing), `6.37 ± 0.12 † 1/2` (one of
    two runs collapsed), or "—"."""
    if cell.mean is None:
        return MISSING
    text = _number(cell.mean, digits)
    if cell.std is not None:
        text += pm + _number(cell.std, digits)
    if cell.partial:
        text += f" (n={cell.n}/{cell.expected})"
    if cell.collapsed:
        text += f" {mark} {cell.collapsed}/{cell.n}"
    return text


def format_delta(value: float | None, digits: int = 2, interval: Delta | None = None, star: str = "*") -> str:
    """`+1.07`, or with its interval `+1.07 [-0.68, +3.04]`, starred when the interval excludes 0."""
    if value is None:
        return MISSING
    text = f"{value:+.{digits}f}"
    if interval is not None:
        text += f"{star if interval.resolved else ''} [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
    return text


def _intervals(delta: DeltaRow) -> tuple:
    return delta.intervals or (None,) * len(delta.values)


def _best_per_column(table: Table) -> list[set[int]]:
    """For each column, the rows whose value is shown in bold."""
    return [table.best(j) for j in range(len(table.columns))]


# --------------------------------------------------------------------------- Markdown


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_caption(table: Table) -> list[str]:
    """The bold title and the notes as a list."""
    return [f"**{_md_escape(table.title)}**", "", *(f"- {_md_escape(n)}" for n in table.notes)]


def _md_header(table: Table) -> list[str]:
    head = _md_line([_md_escape(table.row_header)] + [c.header for c in table.columns])
    return [head, "|---|" + "---:|" * len(table.columns)]


def _md_row(row: Row, bold: list[bool], digits: int) -> str:
    texts = [format_cell(cell, digits) for cell in row.cells]
    return _md_line([_md_escape(row.label)] + [f"**{t}**" if b else t for t, b in zip(texts, bold)])


def _md_delta(delta: DeltaRow, digits: int) -> str:
    cells = [format_delta(v, digits, i, star="\\*") for v, i in zip(delta.values, _intervals(delta))]
    return _md_line([_md_escape(delta.label)] + cells)


def render_markdown(table: Table, digits: int = 2) -> str:
    """Caption and notes, then the table: one line per row (best per column bold), then the Δ rows."""
    best = _best_per_column(table)
    lines = [*_md_caption(table), "", *_md_header(table)]
    lines += [_md_row(row, [i in b for b in best], digits) for i, row in enumerate(table.rows)]
    lines += [_md_delta(d, digits) for d in table.deltas]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- LaTeX

_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "→": r"$\rightarrow$",
    "Δ": r"$\Delta$",
    "±": r"$\pm$",
    "·": r"$\cdot$",
    "−": "$-$",
    "—": "---",
}


def tex_escape(text: str) -> str:
    return text.translate(str.maketrans(_TEX))


Span = tuple[str, int, int]  # (text, first column, last column), 1-based after the label column


def _spans(columns: list[Column]) -> tuple[list[Span], list[Span]]:
    """The header spans: one per dataset, and one per metric within each dataset."""
    datasets: list[Span] = []
    metrics: list[Span] = []
    for j, c in enumerate(columns, start=2):
        if not datasets or datasets[-1][0] != c.dataset:
            datasets.append((c.dataset, j, j))
            metrics.append((c.metric, j, j))
        else:
            datasets[-1] = (c.dataset, datasets[-1][1], j)
            if metrics[-1][0] == c.metric:
                metrics[-1] = (c.metric, metrics[-1][1], j)
            else:
                metrics.append((c.metric, j, j))
    return datasets, metrics


def _tex_header(spans: list[Span], fmt) -> list[str]:
    """A header row of \\multicolumn spans, and the \\cmidrule under each."""
    cells = " & ".join(rf"\multicolumn{{{b - a + 1}}}{{c}}{{{fmt(t)}}}" for t, a, b in spans)
    rules = " ".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in spans)
    return [f" & {cells} \\\\", rules]


def _tex_cell(cell: TableCell, bold: bool, digits: int) -> str:
    text = MISSING if cell.mean is None else format_cell(cell, digits, pm=" $\\pm$ ", mark="$^\\dagger$")
    text = "---" if text == MISSING else text
    return rf"\textbf{{{text}}}" if bold else text


def _tex_preamble(table: Table) -> list[str]:
    """Everything above the column headers: the comment, the float, its caption and label."""
    caption = tex_escape(table.title) + ". " + " ".join(tex_escape(n) for n in table.notes)
    return [
        "% Generated by `orchestrator tables` from the MLflow store; do not edit. Needs \\usepackage{booktabs}.",
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{caption}}}",
        rf"\label{{tab:{file_stem(table.name)}}}",
        rf"\begin{{tabular}}{{l{'r' * len(table.columns)}}}",
    ]


def _tex_body(table: Table, digits: int) -> list[str]:
    """The value rows (best per column bold), then the Δ rows after a rule."""
    best = _best_per_column(table)
    lines = []
    for i, row in enumerate(table.rows):
        cells = [_tex_cell(c, i in best[j], digits) for j, c in enumerate(row.cells)]
        lines.append(" & ".join([tex_escape(row.label)] + cells) + r" \\")
    if table.deltas:
        lines.append(r"\midrule")
        for d in table.deltas:
            values = [_tex_delta(v, i, digits) for v, i in zip(d.values, _intervals(d))]
            lines.append(" & ".join([tex_escape(d.label)] + values) + r" \\")
    return lines


def _tex_delta(value: float | None, interval: Delta | None, digits: int) -> str:
    """`$+1.07$`, or `$+1.07^{*}$ {\\scriptsize [$-0.68$, $+3.04$]}` with its interval."""
    if value is None:
        return "---"
    star = "^{*}" if interval is not None and interval.resolved else ""
    text = f"${value:+.{digits}f}{star}$"
    if interval is not None:
        text += rf" {{\scriptsize [${interval.low:+.{digits}f}$, ${interval.high:+.{digits}f}$]}}"
    return text


def render_latex(table: Table, digits: int = 2) -> str:
    """A booktabs table: dataset and metric header rows with \\cmidrule, best per column \\textbf."""
    datasets, metrics = _spans(table.columns)
    regions = " & ".join([tex_escape(table.row_header)] + [c.region.capitalize() for c in table.columns]) + r" \\"
    lines = [
        *_tex_preamble(table),
        r"\toprule",
        *_tex_header(datasets, tex_escape),
        *_tex_header(metrics, str.upper),
        regions,
        r"\midrule",
        *_tex_body(table, digits),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CSV


def _csv_number(v) -> str:
    return "" if v is None else repr(float(v))


CSV_FIELDS = ("mean", "std", "n", "collapsed", "ci_low", "ci_high", "resolved")


def render_csv(table: Table) -> str:
    """One line per row (kind `value`) and per Δ row (kind `delta`, with its reference); per column
    `{dataset}/{metric}/{region}/` mean, std, n and collapsed (runs) for a value row, mean (the Δ), ci_low,
    ci_high and resolved (the interval excludes 0) for a Δ row; full precision, empty when missing."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    head = ["table", "kind", "label", *table.key_fields, "reference", "seeds_in_grid"]
    writer.writerow(head + [f"{c.key}/{s}" for c in table.columns for s in CSV_FIELDS])
    for row in table.rows:
        keys = dict(row.keys)
        expected = row.cells[0].expected if row.cells else 0
        line = [table.name, "value", row.label, *(keys.get(k, "") for k in table.key_fields), "", expected]
        for c in row.cells:
            line += [_csv_number(c.mean), _csv_number(c.std), c.n, c.collapsed, "", "", ""]
        writer.writerow(line)
    for d in table.deltas:
        keys = dict(d.keys)
        line = [table.name, "delta", d.label, *(keys.get(k, "") for k in table.key_fields), d.reference, ""]
        for v, i in zip(d.values, _intervals(d)):
            bounds = ["", "", ""] if i is None else [_csv_number(i.low), _csv_number(i.high), int(i.resolved)]
            line += [_csv_number(v), "", "", "", *bounds]
        writer.writerow(line)
    return buf.getvalue()
