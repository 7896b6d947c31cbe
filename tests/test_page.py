"""The one page writer: every part of a section, in Markdown and in HTML, in its order."""

from __future__ import annotations

import pandas as pd

from overtrain.analysis.page import Figure, Section, Table, to_html, to_markdown

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def page_parts(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "curve.png").write_bytes(PNG)
    frame = pd.DataFrame({"lr": [1e-4, 1e-3], "bpb": [1.234567, 2.0]})
    section = Section("Findings", ["A paragraph."], [Figure(tmp_path / "figures" / "curve.png", "A curve.")],
                      [("data", frame)], bullets=["first point", "second point"],
                      text_tables=[Table("Shown table:", frame), Table("", frame, index=True)],
                      subsections=[Section("Detail", ["Deeper."]), Section("Empty")])
    return [section, Section("Nothing here")]


def test_markdown_holds_every_part_in_order(tmp_path):
    text = to_markdown("Title", [("model", "tiny")], page_parts(tmp_path), intro=["Opening words."],
                       page_dir=tmp_path)
    order = ["# Title", "Opening words.", "- model: tiny", "## Findings", "A paragraph.", "- first point",
             "- second point", "Shown table:", "| 0.0001 | 1.235 |", "|  0 | 0.0001 | 1.235 |",
             "![curve](figures/curve.png)", "A curve.", "Table `data` (tables/data.csv):", "### Detail", "Deeper."]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions), text
    assert "Empty" not in text and "Nothing here" not in text  # empty sections are left out


def test_figures_link_beside_the_page_by_default(tmp_path):
    assert "![curve](curve.png)" in to_markdown("Title", [], page_parts(tmp_path))


def test_html_holds_every_part(tmp_path):
    page = to_html("Title", [("model", "tiny")], page_parts(tmp_path))
    for part in ("<h2>Findings</h2>", "<p>A paragraph.</p>", "<li>first point</li>", "<p>Shown table:</p>",
                 "data:image/png;base64,", "tables/data.csv", "<h3>Detail</h3>"):
        assert part in page, part
    assert page.index("<li>second point</li>") < page.index("<p>Shown table:</p>") < page.index("<figure>")
    assert "Empty" not in page and "Nothing here" not in page
