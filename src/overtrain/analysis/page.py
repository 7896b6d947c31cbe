"""The one writer of pages: sections of text, figures and tables, rendered two ways.

- `to_html`: one self-contained file; figures are embedded as base64 data URIs and
  the style sheet is inline, so the page opens anywhere with no network and no
  sibling files.
- `to_markdown`: a `.md` page that links the PNG files (relative to the page's folder).

A page is a title, settings (`key: value` pairs) and sections; a Markdown page may
also open with intro paragraphs. A section holds, in this order: paragraphs, bullets,
tables shown in the text, figures, the data tables behind it (the caller saves them
as tables/<stem>.csv), and subsections.

Numbers a person reads carry 3 significant figures: `sig` writes one in words, and
every table on the page is rendered through it (integers stay whole; the CSV files
keep full precision).
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

SIGNIFICANT_DIGITS = 3


def short_tokens(value: float, _position=None) -> str:
    """4096 -> '4.1k', 2.5e9 -> '2.5B': tick labels a person reads at a glance."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def sig(value: float | None, digits: int = SIGNIFICANT_DIGITS, plus: bool = False) -> str:
    """`value` rounded to `digits` significant figures, as a person writes it.

    0.0123456 -> '0.0123', -2.71828 -> '-2.72', 12345.6 -> '12,300', 3.10 -> '3.1',
    1e-05 -> '1e-05' and 2.5e7 -> '2.5e+07' (below 1e-4 or from 1e6 on, powers of ten
    read better than zeros; token counts have `plots.short_tokens`), NaN or None -> 'n/a',
    infinities -> 'inf' / '-inf'. plus: a change, '+' before positive values ('+0.0123').
    """
    if value is None or math.isnan(value):
        return "n/a"
    if plus and value > 0:
        return "+" + sig(value, digits)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= 6 or magnitude < -4:
        return f"{value:.{digits}g}"
    decimals = digits - 1 - magnitude  # negative: round to tens, hundreds...
    text = f"{round(value, decimals):,.{max(decimals, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _cell_text(value) -> str:
    """One table cell: whole numbers whole (a float column of token counts stays exact), others `sig`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, np.floating)):
        return "" if value is None else str(value)
    if math.isnan(value):
        return ""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return sig(value)


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as the page shows it: every cell as text, floats to 3 significant figures."""
    return frame.map(_cell_text).set_axis(frame.index.map(_cell_text), axis=0)


def _alignment(frame: pd.DataFrame, index: bool) -> list[str]:
    """Numbers right, text left, in a Markdown table."""
    columns = [frame.index, *(frame[c] for c in frame.columns)] if index else [frame[c] for c in frame.columns]
    return ["right" if pd.api.types.is_numeric_dtype(c) and not pd.api.types.is_bool_dtype(c) else "left"
            for c in columns]


def markdown_table(frame: pd.DataFrame, index: bool = False) -> str:
    return shown(frame).to_markdown(index=index, disable_numparse=True, colalign=_alignment(frame, index))


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str  # what the plot shows, in numbers


@dataclass(frozen=True)
class Table:
    """A table shown in full in the text, under its caption (no caption line when empty)."""
    caption: str
    frame: pd.DataFrame
    index: bool = False  # show the frame's index as the first column


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (file stem, table): tables/<stem>.csv
    lead: bool = False  # the answer: drawn as a highlighted box at the top
    bullets: list[str] = field(default_factory=list)
    text_tables: list[Table] = field(default_factory=list)
    subsections: list[Section] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.paragraphs or self.bullets or self.text_tables or self.figures or self.tables
                    or any(not sub.is_empty() for sub in self.subsections))


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.25em; margin-top: 36px; border-bottom: 1px solid #d5d9e0; padding-bottom: 4px; }
p, li { line-height: 1.5; max-width: 70em; }
.settings { font-size: 0.88em; color: #4a5262; }
.settings td { padding: 1px 14px 1px 0; vertical-align: top; }
.lead { background: #fff; border-left: 6px solid #2a7ae2; border-radius: 6px; padding: 4px 22px 12px;
        box-shadow: 0 1px 3px rgba(0,0,0,.08); }
.lead h2 { border: none; margin-top: 14px; }
.lead p:first-of-type { font-size: 1.12em; }
figure { margin: 16px 0; background: #fff; padding: 10px; border-radius: 6px; box-shadow: 0 1px 3px rgba(0,0,0,.06); }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 0.92em; color: #333a47; margin-top: 6px; line-height: 1.45; }
details { margin: 8px 0; font-size: 0.85em; }
summary { cursor: pointer; color: #2a5db0; }
table.data { border-collapse: collapse; margin: 6px 0; background: #fff; }
table.data th, table.data td { border: 1px solid #e0e3e8; padding: 2px 8px; text-align: right; }
table.data th { background: #eef1f5; }
"""


# -- HTML ------------------------------------------------------------------------------

def to_html(title: str, settings: list[tuple[str, str]], sections: list[Section]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in settings)
    body = "".join(_section_html(section) for section in sections if not section.is_empty())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f'<body><main><h1>{html.escape(title)}</h1><table class="settings">{rows}</table>{body}</main></body></html>\n')


def _section_html(section: Section, level: int = 2) -> str:
    parts = [f"<h{level}>{html.escape(section.title)}</h{level}>"]
    parts += [f"<p>{html.escape(text)}</p>" for text in section.paragraphs]
    if section.bullets:
        parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in section.bullets) + "</ul>")
    for table in section.text_tables:
        parts += [f"<p>{html.escape(table.caption)}</p>"] if table.caption else []
        parts.append(_frame_html(table.frame, table.index))
    parts += [_figure_html(figure) for figure in section.figures]
    if section.tables:
        parts.append(_tables_html(section.tables))
    parts += [_section_html(sub, level + 1) for sub in section.subsections if not sub.is_empty()]
    inner = "".join(parts)
    return f'<section class="lead">{inner}</section>' if section.lead else f"<section>{inner}</section>"


def _figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    alt = html.escape(figure.caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def _frame_html(frame: pd.DataFrame, index: bool = False) -> str:
    return shown(frame).to_html(index=index, border=0, classes="data")


def _tables_html(named_tables: list[tuple[str, pd.DataFrame]]) -> str:
    """The section's tables folded under one line: the numbers, for those who want them."""
    parts = [f"<h4>{html.escape(name)} <small>(tables/{html.escape(name)}.csv)</small></h4>" + _frame_html(table)
             for name, table in named_tables]
    names = ", ".join(name for name, _ in named_tables)
    return f"<details><summary>Tables: {html.escape(names)}</summary>{''.join(parts)}</details>"


# -- Markdown ----------------------------------------------------------------------------

def to_markdown(title: str, settings: list[tuple[str, str]], sections: list[Section], intro: Sequence[str] = (),
                page_dir: Path | None = None) -> str:
    """The page as Markdown; figures link relative to `page_dir` (default: the PNGs sit beside the page)."""
    lines = [f"# {title}", ""]
    lines += [f"{text}\n" for text in intro]
    if settings:
        lines += [*(f"- {key}: {value}" for key, value in settings), ""]
    for section in sections:
        lines += _section_markdown(section, page_dir)
    return "\n".join(lines) + "\n"


def _section_markdown(section: Section, page_dir: Path | None, level: int = 2) -> list[str]:
    if section.is_empty():
        return []
    lines = [f"{'#' * level} {section.title}", ""]
    lines += [f"{text}\n" for text in section.paragraphs]
    if section.bullets:
        lines += [*(f"- {item}" for item in section.bullets), ""]
    for table in section.text_tables:
        lines += [table.caption, ""] if table.caption else []
        lines += [markdown_table(table.frame, table.index), ""]
    for figure in section.figures:
        link = os.path.relpath(figure.path, page_dir) if page_dir is not None else figure.path.name
        lines.append(f"![{figure.path.stem}]({Path(link).as_posix()})\n\n{figure.caption}\n")
    for name, table in section.tables:
        lines += [f"Table `{name}` (tables/{name}.csv):", "",
                  markdown_table(table), ""]
    for sub in section.subsections:
        lines += _section_markdown(sub, page_dir, level + 1)
    return lines
