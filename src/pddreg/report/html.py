"""One self-contained HTML report: a results table, pictures embedded as base64 PNG, settings.

The file needs no server and no other file: open it in any browser.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ReportFigure", "render_report", "rows_to_html", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.scroll { overflow-x: auto; } .figures { display: flex; flex-wrap: wrap; gap: 0.5em; }
figure { margin: 0.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class ReportFigure:
    """A picture of the report: caption and PNG bytes (or a path to a PNG file)."""

    caption: str
    png: bytes | str | os.PathLike[str]

    def data(self) -> bytes:
        if isinstance(self.png, (bytes, bytearray)):
            return bytes(self.png)
        return Path(self.png).read_bytes()


def _cell(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        if math.isnan(value):
            return "&ndash;"
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3e}"
    return html.escape(str(value))


def rows_to_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """An HTML table from a list of dicts (one row each); columns default to the union, in order."""
    if not rows:
        return "<p>(no results)</p>"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f'<div class="scroll"><table>\n<tr>{head}</tr>\n{body}\n</table></div>'


def render_report(
    title: str,
    table_rows: Sequence[Mapping[str, Any]] = (),
    table_text: str | None = None,
    figures: Sequence[ReportFigure] | Sequence[tuple[str, Sequence[ReportFigure]]] = (),
    settings: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The report as one HTML string.

    Args:
        title: page title.
        table_rows: results, one dict per row (e.g. one per method).
        table_text: the same table as plain text (shown preformatted), optional.
        figures: pictures, or sections as (heading, pictures).
        settings: what produced the results (shown as a table).
        notes: paragraphs of text shown under the title.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    if table_rows or table_text:
        parts.append("<h2>Results</h2>")
        if table_rows:
            parts.append(rows_to_html(table_rows))
        if table_text:
            parts.append(f"<pre>{html.escape(table_text)}</pre>")
    sections: list[tuple[str, Sequence[ReportFigure]]] = []
    if figures and isinstance(figures[0], ReportFigure):
        sections = [("Pictures", figures)]  # type: ignore[list-item]
    else:
        sections = list(figures)  # type: ignore[arg-type]
    for heading, figs in sections:
        parts.append(f'<h2>{html.escape(heading)}</h2><div class="figures">')
        for fig in figs:
            b64 = base64.b64encode(fig.data()).decode("ascii")
            cap = html.escape(fig.caption)
            parts.append(
                f'<figure><img alt="{cap}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{cap}</figcaption></figure>"
            )
        parts.append("</div>")
    if settings:
        parts.append("<h2>Settings</h2>")
        parts.append(rows_to_html([{"setting": k, "value": v} for k, v in settings.items()], None))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write :func:`render_report` (same keyword arguments) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report(**kwargs), encoding="utf-8")
    os.replace(tmp, path)
    return path
