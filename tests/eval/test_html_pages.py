"""The HTML pages, parsed with html.parser: ``compare.html`` of ``thinkrl prompts compare`` (summary table, then one
row per item and one column per template) and the top of ``thinkrl eval``'s ``report.html`` (results table, plots).

``scripts/check_html.sh`` renders both in headless Chromium for a person to look at; these tests check structure.
"""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

import pytest
from eval_fixtures import TINY_BYTE, write_eval_data

from thinkrl.cli import main
from thinkrl.eval.compare import compare_items, thought_answer
from thinkrl.eval.report import compare_html, compare_table_html, html_report, plot_token_deltas

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: Node | None = None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        for c in self.children:
            if isinstance(c, Node):
                yield c
                yield from c.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if n.tag == tag and (cls is None or cls in n.attrs.get("class", "").split())]

    def find(self, tag: str, cls: str | None = None) -> Node:
        found = self.find_all(tag, cls)
        assert found, f"no <{tag} class={cls}>"
        return found[0]

    def rows(self, section: str) -> list[Node]:
        return [
            tr for part in self.find_all(section) for tr in part.children if isinstance(tr, Node) and tr.tag == "tr"
        ]

    def cells(self) -> list[Node]:
        return [c for c in self.children if isinstance(c, Node) and c.tag in ("th", "td")]


class Tree(HTMLParser):
    """A strict little DOM: every element but the void ones must be closed, in order."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {})
        self.order: list[Node] = []  # elements in document order
        self.feed(page)
        self.close()
        assert self.node is self.root, f"<{self.node.tag}> never closed"

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(node)
        self.order.append(node)
        if tag not in VOID:
            self.node = node

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.node.tag == tag, f"</{tag}> closes <{self.node.tag}>"
        self.node = self.node.parent

    def handle_data(self, data):
        self.node.children.append(data)

    def position(self, node: Node) -> int:
        return self.order.index(node)


def _parse(path) -> Tree:
    return Tree(path.read_text(encoding="utf-8"))


def _check_compare_page(tree: Tree, templates: list[str], n_items: int) -> list[list[Node]]:
    """The summary table first (one row per template), then the item table: one row per item, one column per
    template; returns each item row's template cells."""
    summary, items = tree.root.find_all("table")
    assert "results" in summary.attrs["class"] and "items" in items.attrs["class"]
    assert tree.position(summary) < tree.position(items)
    assert [row.cells()[0].text() for row in summary.rows("tbody")] == templates
    assert [c.text() for c in summary.rows("thead")[0].cells()][:2] == ["template", "mean reward"]
    (head,) = items.rows("thead")
    assert [c.text() for c in head.cells()] == ["item", *templates]
    assert len(items.find_all("col")) == 1 + len(templates)
    widths = {c.attrs["style"] for c in items.find_all("col")[1:]}
    assert len(widths) == 1  # the templates' columns share one width
    body = items.rows("tbody")
    assert len(body) == n_items
    cells = []
    for row in body:
        first, *rest = row.cells()
        assert first.tag == "th" and first.text().startswith("item ")
        assert len(rest) == len(templates) and all(c.tag == "td" for c in rest)
        cells.append(rest)
    return cells


def test_compare_page_from_records(tmp_path):
    """Best thought, its reward and right/wrong per cell, every text escaped, long thoughts folded."""
    long = "step " * 100

    def rec(i, thoughts, letter_logp):
        return {
            "id": i,
            "gold": "B",
            "question": "Is <b>bold</b> & safe?",
            "labels": ["A", "B"],
            "texts": ["<script>x</script>", "yes"],
            "thoughts": [{"text": t, "reward": r, "finished": True, "length": 3} for t, r in thoughts],
            "sampled": {"letter_logp": letter_logp},
        }

    records = {
        "a/<x>": [rec(0, [("<i>think</i>", -0.5), ("better", 0.25)], [[0.0, -1.0], [-2.0, -0.1]])],
        "b": [rec(0, [(long, 1.5), ("", -0.1)], [[-0.1, -3.0], [-0.2, -1.0]])],
    }
    items = compare_items("csqa", records)
    assert [c["thought"] for c in items[0]["cells"]] == ["better", long]
    assert [(c["answer"], c["right"]) for c in items[0]["cells"]] == [("B", True), ("A", False)]
    rows = [
        {"template": name, "reward_mean": {"value": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 1}} for name in records
    ]
    columns = [("template", "template"), ("reward_mean", "mean reward")]
    summary = compare_table_html(rows, columns, ["a__<x>/report.html", None])
    path = tmp_path / "compare.html"
    compare_html(path, "compare <t>", summary, list(records), items, ["a note & more"])
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "<i>" not in page and "<b>bold" not in page and "a/<x>" not in page
    tree = Tree(page)
    (cells,) = _check_compare_page(tree, list(records), 1)
    assert tree.root.find("title").text() == "compare <t>"
    assert tree.root.find("a").attrs["href"] == "a__<x>/report.html"  # escaped in the page, the same URL once parsed
    item_head = tree.root.find("table", "items").rows("tbody")[0].cells()[0].text()
    assert "Is <b>bold</b> & safe?" in item_head and "gold: B" in item_head
    plain, folded = cells
    assert plain.find("div", "thought").text() == "better"
    assert plain.find("span", "reward").text() == "reward +0.250" and plain.attrs["data-reward"] == "0.250000"
    assert plain.find("span", "verdict").text() == "✓ right (B)" and plain.attrs["data-right"] == "true"
    assert folded.find("span", "verdict").text() == "✗ wrong (A)" and folded.attrs["data-right"] == "false"
    assert "top" in folded.attrs["class"] and "top" not in plain.attrs["class"]  # the row's highest reward
    details = folded.find("details", "long")  # a long thought: its start shows, the whole opens
    assert details.find("summary").text().endswith(" …") and details.find("div", "thought").text() == long
    others = plain.find("details", "others")
    assert others.find("summary").text() == "all 2 thoughts"
    assert [li.text() for li in others.find_all("li")] == [
        "reward +0.250✓ right (B) better",
        "reward -0.500✗ wrong (A) <i>think</i>",
    ]
    assert "(empty)" in folded.find("details", "others").text()
    sticky = tree.root.find("style").text()
    assert "position: sticky" in sticky and "table-layout: fixed" in sticky


def test_thought_answer_per_task():
    gsm = {"sampled": {"pred": ["7", None], "correct": [True, False]}, "thoughts": []}
    assert thought_answer("gsm8k", gsm, 0) == ("7", True)
    assert thought_answer("gsm8k", gsm, 1) == ("no number", False)
    assert thought_answer("gsm8k", {"sampled": {"likelihood": [0.1]}}, 0) == (None, None)  # --no-generate
    assert thought_answer("text", {"logp": {}}, 0) == (None, None)


def _png(path, mean: float) -> None:
    plot_token_deltas([mean + d / 10 for d in range(-5, 6)], path, "t")


def test_report_top_has_results_table_and_plots(tmp_path):
    """report.html opens with the folder's results (results.json) and its plots as data URIs, before the items."""
    results = {
        "task": "gsm8k",
        "model": "m<1>",
        "n_items": 2,
        "seed": 0,
        "modes": ["none", "sampled:2"],
        "metrics": {
            "none/accuracy": {"value": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": 2},
            "sampled:2/accuracy": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 2},
            "sampled:2/reward_mean": {"value": 0.25, "ci_low": 0.1, "ci_high": 0.4, "n": 2},
        },
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    for name, mean in (("token_deltas.png", 0.0), ("accuracy.png", 1.0), ("extra.png", 2.0)):
        _png(tmp_path / "plots" / name, mean)
    item = {"title": "item 0", "context": "What is <6x7>?", "thought": "<think>", "tokens": [[" 42", 1.0]]}
    html_report([item], tmp_path / "report.html", "eval")
    tree = _parse(tmp_path / "report.html")
    table = tree.root.find("table", "results")
    assert [c.text() for c in table.rows("thead")[0].cells()] == ["metric", "none", "sampled:2"]
    body = [[c.text() for c in row.cells()] for row in table.rows("tbody")]
    assert body == [
        ["accuracy", "0.500 [0.000, 1.000]", "1.000 [1.000, 1.000]"],
        ["reward_mean", "", "0.250 [0.100, 0.400]"],
    ]
    images = tree.root.find_all("img")
    assert [img.attrs["alt"] for img in images] == ["plots/accuracy.png", "plots/token_deltas.png", "plots/extra.png"]
    for img, name in zip(images, ("accuracy.png", "token_deltas.png", "extra.png")):
        prefix = "data:image/png;base64,"
        assert img.attrs["src"].startswith(prefix)
        assert base64.b64decode(img.attrs["src"][len(prefix) :]) == (tmp_path / "plots" / name).read_bytes()
    first_item = tree.root.find("div", "item")
    assert tree.position(table) < tree.position(images[-1]) < tree.position(first_item)
    assert "m<1>" in tree.root.find("p", "note").text()
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<think>" not in page and "&lt;think&gt;" in page and "m&lt;1&gt;" in page


def test_report_without_results_or_plots_is_the_item_view(tmp_path):
    html_report([{"title": "t", "context": "", "thought": None, "tokens": []}], tmp_path / "r.html", "t")
    tree = _parse(tmp_path / "r.html")
    assert not tree.root.find_all("table") and not tree.root.find_all("img")


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """A real ``thinkrl prompts compare`` of four templates on three CSQA items (each template folder holds a real
    ``thinkrl eval`` report.html)."""
    tmp = tmp_path_factory.mktemp("cmp")
    data, out = write_eval_data(tmp), tmp / "cmp"
    templates = ["thinking/plain", "thinking/system", "thinking/math", "thinking/fewshot"]
    args = ["--config", "configs/default.yaml", "--task", "csqa", "--limit", "3", "--thoughts", "sampled:2"]
    code = main(
        [
            "prompts",
            "compare",
            *templates,
            *args,
            "--no-generate",
            "--output",
            str(out),
            *TINY_BYTE,
            f"data.data_dir={data}",
        ]
    )
    assert code == 0
    return out, templates


def test_compare_html_of_a_real_comparison(comparison):
    out, templates = comparison
    tree = _parse(out / "compare.html")
    cells = _check_compare_page(tree, templates, 3)
    folders = [out / t.replace("/", "__") for t in templates]
    links = [a.attrs["href"] for a in tree.root.find("table", "results").find_all("a")]
    assert links == [f"{f.name}/report.html" for f in folders] and all((f / "report.html").is_file() for f in folders)
    records = [[json.loads(x) for x in (f / "items.jsonl").read_text().splitlines()] for f in folders]
    for i, row in enumerate(cells):
        for cell, recs in zip(row, records):
            rec = recs[i]
            best = max(rec["thoughts"], key=lambda t: t["reward"])
            assert cell.find("div", "thought").text() == best["text"] or "empty" in cell.find("div", "thought").text()
            assert cell.find("span", "reward").text() == f"reward {best['reward']:+.3f}"
            j = rec["thoughts"].index(best)
            letter = rec["labels"][max(range(5), key=lambda c: rec["sampled"]["letter_logp"][j][c])]
            verdict = "✓ right" if letter == rec["gold"] else "✗ wrong"
            assert cell.find("span", "verdict").text() == f"{verdict} ({letter})"


def test_report_html_of_a_real_evaluation(comparison):
    out, templates = comparison
    folder = out / templates[0].replace("/", "__")
    tree = _parse(folder / "report.html")
    results = json.loads((folder / "results.json").read_text())
    table = tree.root.find("table", "results")
    metrics = [row.cells()[0].text() for row in table.rows("tbody")]
    assert {"letter_accuracy", "reward_mean", "null_rate"} <= set(metrics)
    assert len(metrics) == len({k.split("/", 1)[1] for k in results["metrics"]})
    images = [img.attrs["alt"] for img in tree.root.find_all("img")]
    assert images == ["plots/accuracy.png", "plots/token_deltas.png"]
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["accuracy.png", "token_deltas.png"]
    assert tree.position(tree.root.find_all("img")[-1]) < tree.position(tree.root.find("div", "item"))
