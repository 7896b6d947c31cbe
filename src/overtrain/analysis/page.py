"""A report page: sections of text, figures and tables, rendered two ways.

- `to_html`: one self-contained file; figures are embedded as base64 data URIs and
  the style sheet is inline, so the page opens anywhere with no network and no
  sibling files.
- `to_markdown`: `summary.md`, which links the PNG files beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

FLOAT_FORMAT = "{:.4g}".format


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str  # what the plot shows, in numbers


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (file stem, table)
    lead: bool = False  # the answer: drawn as a highlighted box at the top

    def is_empty(self) -> bool:
        return not (self.paragraphs or self.figures or self.tables)


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 1.6em; margin-bottom: 4px; }
h2 { font-size: 1.25em; margin-top: 36px; border-bottom: 1px solid #d5d9e0; padding-bottom: 4px; }
p { line-height: 1.5; max-width: 70em; }
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


def to_html(title: str, settings: list[tuple[str, str]], sections: list[Section]) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in settings)
    body = "".join(_section_html(section) for section in sections if not section.is_empty())
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
            f'<body><main><h1>{html.escape(title)}</h1><table class="settings">{rows}</table>{body}</main></body></html>\n')


def _section_html(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    parts += [f"<p>{html.escape(text)}</p>" for text in section.paragraphs]
    parts += [_figure_html(figure) for figure in section.figures]
    if section.tables:
        parts.append(_tables_html(section.tables))
    inner = "".join(parts)
    return f'<section class="lead">{inner}</section>' if section.lead else f"<section>{inner}</section>"


def _figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
    alt = html.escape(figure.caption, quote=True)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def _tables_html(named_tables: list[tuple[str, pd.DataFrame]]) -> str:
    """The section's tables folded under one line: the numbers, for those who want them."""
    parts = [f"<h4>{html.escape(name)} <small>(tables/{html.escape(name)}.csv)</small></h4>"
             + table.to_html(index=False, border=0, classes="data", float_format=FLOAT_FORMAT, na_rep="")
             for name, table in named_tables]
    names = ", ".join(name for name, _ in named_tables)
    return f"<details><summary>Tables: {html.escape(names)}</summary>{''.join(parts)}</details>"


def to_markdown(title: str, settings: list[tuple[str, str]], sections: list[Section]) -> str:
    lines = [f"# {title}", "", *(f"- {key}: {value}" for key, value in settings), ""]
    for section in sections:
        if section.is_empty():
            continue
        lines += [f"## {section.title}", ""]
        lines += [f"{text}\n" for text in section.paragraphs]
        lines += [f"![{figure.path.stem}]({figure.path.name})\n\n{figure.caption}\n" for figure in section.figures]
        for name, table in section.tables:
            lines += [f"Table `{name}` (tables/{name}.csv):", "", table.to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines) + "\n"
