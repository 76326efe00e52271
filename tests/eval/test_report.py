"""Evaluation reports: markdown tables, PNG plots, the HTML token view and NaN-safe JSON."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from thinkrl.eval.report import (
    compare_table,
    contrast_ratio,
    html_report,
    markdown_table,
    plot_accuracy,
    plot_token_deltas,
    write_json,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ci(value, low, high, n=200):
    return {"value": value, "ci_low": low, "ci_high": high, "n": n}


RESULTS = {
    "task": "gsm8k",
    "model": "smollm2-135m-instruct",
    "n_items": 200,
    "seed": 0,
    "modes": ["none", "null", "sampled:4"],
    "metrics": {
        "none/accuracy": _ci(0.345, 0.3, 0.39),
        "null/accuracy": _ci(0.35, 0.2951, 0.4049),
        "sampled:4/accuracy": _ci(0.4, 0.33, 0.47),
        "sampled:4/accuracy_maj": _ci(0.42, 0.35, 0.49),
        "none/nll_tokens": _ci(123.456, 110.04, 140.96),
    },
}


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_markdown_table_cells():
    lines = markdown_table(RESULTS).splitlines()
    assert lines[0] == "### gsm8k · smollm2-135m-instruct · N=200 · seed 0"
    assert lines[2] == "| metric | none | null | sampled:4 |"
    assert lines[3] == "|---|---|---|---|"
    assert lines[4] == "| accuracy | 0.345 [0.300, 0.390] | 0.350 [0.295, 0.405] | 0.400 [0.330, 0.470] |"
    assert lines[5] == "| accuracy_maj |  |  | 0.420 [0.350, 0.490] |"  # modes without the metric: empty cells
    assert lines[6] == "| nll_tokens | 123.5 [110.0, 141.0] |  |  |"  # |v| >= 100: one decimal
    assert lines[-1] == "intervals: 95% bootstrap over items"


def test_markdown_table_nan_and_unlisted_modes():
    results = {
        "task": "csqa",
        "model": "m",
        "n_items": 0,
        "seed": 1,
        "modes": ["none"],
        "metrics": {"none/accuracy": _ci(math.nan, math.nan, math.nan, 0), "extra/accuracy": _ci(0.5, 0.5, 0.5, 1)},
    }
    table = markdown_table(results)
    assert "| metric | none | extra |" in table
    assert "| accuracy | nan [nan, nan] | 0.500 [0.500, 0.500] |" in table


def test_compare_table_formatting():
    rows = [
        {"template": "tasks/gsm8k", "acc": _ci(0.3456, 0.3, 0.39), "nll": 1.23456, "n": 200},
        {"template": "a|b", "acc": _ci(150.0, 140.04, 160.0), "nll": None},
    ]
    table = compare_table(rows, [("template", "prompt"), ("acc", "accuracy"), ("nll", "NLL"), ("n", "N")])
    assert table.splitlines() == [
        "| prompt | accuracy | NLL | N |",
        "|---|---|---|---|",
        "| tasks/gsm8k | 0.346 [0.300, 0.390] | 1.235 | 200 |",
        "| a\\|b | 150.0 [140.0, 160.0] |  |  |",
    ]


def test_plot_token_deltas_writes_png(tmp_path):
    path = tmp_path / "plots" / "deltas.png"  # the parent folder does not exist yet
    plot_token_deltas(list(np.random.default_rng(0).normal(0.2, 1.0, 500)), path, "thought minus null")
    assert _is_png(path)


def test_plot_token_deltas_empty(tmp_path):
    path = tmp_path / "empty.png"
    plot_token_deltas([], path, "nothing")
    assert _is_png(path)


def test_plot_accuracy(tmp_path):
    path = tmp_path / "acc.png"
    assert plot_accuracy(RESULTS, path) is True
    assert _is_png(path)


def test_plot_accuracy_without_metrics_writes_nothing(tmp_path):
    path = tmp_path / "acc.png"
    results = {**RESULTS, "metrics": {"none/nll_tokens": _ci(1.0, 0.9, 1.1)}}
    assert plot_accuracy(results, path) is False
    assert not path.exists()


def test_html_report(tmp_path):
    items = [
        {
            "title": "item 17 — correct",
            "context": "x" * 1000 + "END",
            "thought": "carry the <b>one</b>",
            "tokens": [["<script>alert(1)</script>", 1.0], [" 72", -4.0], ["\n", None], ["#", 0.0]],
            "note": "gold 72, predicted 70",
        },
        {"title": "item 18", "context": "short", "thought": None, "tokens": []},
    ]
    path = tmp_path / "html" / "report.html"
    html_report(items, path, "GSM8K <thoughts>")
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;one&lt;/b&gt;" in page and "<title>GSM8K &lt;thoughts&gt;</title>" in page
    assert page.count('<div class="thought">') == 1  # only the item that has one
    assert '<div class="label">thought</div>' in page
    assert "…" + "x" * 597 + "END</div>" in page and "x" * 601 not in page  # the last 600 chars of the context
    # Positive delta: green at half strength; negative: red at full strength (|Δ| >= 2), in white text so the token
    # stays readable; tooltips with 3 decimals.
    assert 'title="Δ +1.000" style="background-color: rgba(0, 150, 0, 0.500); color: #000">&lt;script&gt;' in page
    assert 'title="Δ -4.000" style="background-color: rgba(210, 0, 0, 1.000); color: #fff"> 72</span>' in page
    assert 'title="Δ n/a"><span class="nl">↵</span>\n</span>' in page  # the newline is kept, and visible
    assert 'title="Δ +0.000">#</span>' in page  # no colour without a difference
    assert "white-space: pre-wrap" in page
    assert "gold 72, predicted 70" in page
    assert "green</span> = the thought helped" in page  # the legend


_STYLE = re.compile(r'style="background-color: rgba\((\d+), (\d+), (\d+), ([\d.]+)\); color: (#000|#fff)"')


def _cells(page: str) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
    """(cell colour over the white page, text colour) of every coloured token."""
    out = []
    for r, g, b, a, text in _STYLE.findall(page):
        alpha = float(a)
        cell = tuple(alpha * int(c) + (1 - alpha) * 255 for c in (r, g, b))
        out.append((cell, (0, 0, 0) if text == "#000" else (255, 255, 255)))
    return out


def test_token_colours_keep_the_text_readable(tmp_path):
    deltas = [d / 20 for d in range(-80, 81) if d]  # -4 .. +4 nats, both colours at every strength
    path = tmp_path / "r.html"
    html_report([{"title": "t", "context": "", "thought": None, "tokens": [["ab", d] for d in deltas]}], path, "t")
    cells = _cells(path.read_text(encoding="utf-8"))
    assert len(cells) >= len(deltas)  # the items' tokens (and the legend's swatches)
    for cell, text in cells:
        assert contrast_ratio(cell, text) >= 4.5, (cell, text)  # WCAG AA for body text
    strongest = [text for cell, text in cells if min(cell) < 1]  # full-strength cells: rgb(0, 150, 0) / (210, 0, 0)
    assert strongest and (255, 255, 255) in strongest  # the darkest (full red) switches to white text
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)


def test_passage_view_marks_every_thought_position(tmp_path):
    tokens = [[c, None] for c in "The cat sat"]
    tokens[4][1], tokens[5][1], tokens[8][1] = 2.5, -0.5, 0.75
    passage = {
        "title": "window 3",
        "tokens": tokens,
        "marks": [
            {"at": 4, "thought": "a <pet> follows", "reward": 1.25},
            {"at": 8, "thought": "a verb", "reward": -0.5},
            {"at": 10, "thought": None, "reward": None},
        ],
        "note": "3 thought positions",
    }
    path = tmp_path / "r.html"
    html_report([], path, "text", passages=[passage])
    page = path.read_text(encoding="utf-8")
    body = page[page.index('<div class="text passage">') :]
    body = body[: body.index("</div>")]
    marks = re.findall(
        r'<span class="mark[^"]*" tabindex="0" aria-label="thought"><span class="tip">(.*?)</span></span>', body, re.S
    )
    assert len(marks) == 3  # one per thought position
    assert "a &lt;pet&gt; follows" in marks[0] and "reward +1.250" in marks[0]
    assert "a verb" in marks[1] and "reward -0.500" in marks[1]
    assert "no sampled thought" in marks[2]
    # Each marker sits right before the first token its thought predicts; tokens are coloured by their Δ.
    assert body.index("a &lt;pet&gt;") < body.index('title="Δ +2.500"') < body.index("a verb")
    assert body.index("a verb") < body.index('title="Δ +0.750"')
    assert '<span class="mark gain"' in body  # a positive reward
    assert body.count('title="no thought predicts this token"') == len(tokens) - 3
    assert "log p(token | the null thought)" in page  # the legend says what the colours are
    assert "3 thought positions" in page and "<h2>Passages</h2>" in page


def test_copying_thoughts_are_marked(tmp_path):
    """A thought that holds y_1 / the whole target gets a badge, in the item view and in a passage marker's tip."""
    items = [
        {"title": f"item {i}", "context": "", "thought": "z", "copies": copies, "tokens": []}
        for i, copies in enumerate(("target", "first", None))
    ]
    marks = [{"at": 0, "thought": "y", "reward": 1.0, "copies": "first"}, {"at": 1, "thought": "q", "reward": 0.5}]
    passage = {"title": "w", "tokens": [["a", None], ["b", None]], "marks": marks}
    path = tmp_path / "r.html"
    html_report(items, path, "t", passages=[passage])
    page = path.read_text(encoding="utf-8")
    views = page[page.index('<div class="item">') :]  # after the legend, which shows both badges once
    labels = re.findall(r'<div class="label">thought(.*?)</div>', views)
    assert labels == [
        ' <span class="copy" title="copy gauge">copies the target</span>',
        ' <span class="copy" title="copy gauge">contains y_1</span>',
        "",
    ]
    tips = re.findall(r'<span class="tip"><span class="label">(.*?)\n', views)
    assert tips == ['best thought, reward +1.000 <span class="copy" title="copy gauge">contains y_1</span></span>',
                    "best thought, reward +0.500</span>"]  # fmt: skip


def test_write_json_nan_to_null(tmp_path):
    path = tmp_path / "out" / "results.json"
    write_json(path, {"a": math.nan, "b": [1.5, math.inf, -math.inf], "c": np.float32(0.5), "d": np.array([1, 2])})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None, None], "c": 0.5, "d": [1, 2]}
    assert "NaN" not in path.read_text()
    write_json(path, {"a": 1})  # overwrite in place, no temporary files left behind
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
