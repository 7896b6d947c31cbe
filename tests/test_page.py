"""The one page writer: every part of a section, in Markdown and in HTML, in its order."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from overtrain.analysis.page import Figure, Section, Table, markdown_table, sig, to_html, to_markdown

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
             "- second point", "Shown table:", "| 0.0001 |  1.23 |", "|  0 | 0.0001 |  1.23 |",
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


@pytest.mark.parametrize("value, text", [
    (0.0123456, "0.0123"), (-2.71828, "-2.72"), (3.10, "3.1"), (999.7, "1,000"), (12345.6, "12,300"),
    (0.0003, "0.0003"), (1e-05, "1e-05"), (2.5e7, "2.5e+07"), (0, "0"), (np.float32(0.5), "0.5"),
    (float("nan"), "n/a"), (None, "n/a"), (float("inf"), "inf"), (-float("inf"), "-inf")])
def test_sig_writes_three_significant_figures(value, text):
    assert sig(value) == text


def test_sig_writes_fewer_figures_and_signs_on_request():
    assert sig(0.8912, 2) == "0.89" and sig(0.0412, plus=True) == "+0.0412" and sig(-0.0412, plus=True) == "-0.0412"


def test_tables_show_three_significant_figures_and_whole_numbers_whole():
    frame = pd.DataFrame({"schedule": ["cosine", "wsd"], "tokens": [4096, 16777216], "budget": [4096.0, np.nan],
                          "bpb": [2.7132861, 1234.5678], "diverged": [False, True]})
    table = markdown_table(frame)
    assert "|  2.71 |" in table and "| 1,230 |" in table  # floats: 3 significant figures
    assert "| 16777216 |" in table and "|     4096 |" in table  # ints, and whole floats, stay whole
    assert "nan" not in table and "True" in table
    html = to_html("T", [], [Section("S", text_tables=[Table("", frame)])])
    assert "<td>2.71</td>" in html and "<td>16777216</td>" in html and "2.713" not in html
