"""What an evaluation writes besides its per-item jsonl: markdown tables, PNG plots, HTML pages, JSON.

The HTML pages are self-contained (inline CSS, plots as data URIs, no JS) and every text in them is escaped:
``report.html`` (``thinkrl eval``: the results table and the plots, then each item's best thought with the answer
tokens coloured by Δ log-prob) and ``compare.html`` (``thinkrl prompts compare``: the summary table, then one row
per item with one column per template).

Metrics are ``{"value", "ci_low", "ci_high", "n"}`` dicts (see ``thinkrl.eval.stats``) keyed ``"<mode>/<metric>"``.
matplotlib is imported inside the plotting functions so that importing this module stays cheap; the plots draw on
an Agg canvas directly, which needs no display and leaves the caller's pyplot backend alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

from thinkrl.run.files import write_atomic

PathLike = str | os.PathLike

CI_NOTE = "intervals: 95% bootstrap over items"
CI_NOTE_GROUPED = "intervals: 95% bootstrap over windows (the positions of a window are resampled together)"
DEFAULT_PLOT_METRICS = (
    "accuracy",
    "accuracy_maj",
    "accuracy_best",
    "likelihood_score",
    "letter_accuracy",
    "text_accuracy",
)


# ---------------------------------------------------------------- files


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None (JSON has no such numbers); numpy scalars and arrays → Python values; tuples → lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch values, without importing either
        return _json_safe(obj.tolist())
    return obj


def write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON, with NaN and ±inf written as null."""
    text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)
    write_atomic(path, (text + "\n").encode("utf-8"))


# ---------------------------------------------------------------- markdown


def _num(x: Any) -> float:
    """A metric field as a float; None (a NaN that went through JSON) and missing fields become NaN."""
    return math.nan if x is None else float(x)


def _fmt(x: float, decimals: int) -> str:
    return "nan" if math.isnan(x) else f"{x:.{decimals}f}"


def format_metric(metric: dict) -> str:
    """``0.345 [0.300, 0.390]``: 3 decimals, or 1 when |value| >= 100 (the interval follows the value)."""
    value = _num(metric.get("value"))
    decimals = 1 if math.isfinite(value) and abs(value) >= 100 else 3
    if "ci_low" not in metric or "ci_high" not in metric:
        return _fmt(value, decimals)
    low, high = _fmt(_num(metric["ci_low"]), decimals), _fmt(_num(metric["ci_high"]), decimals)
    return f"{_fmt(value, decimals)} [{low}, {high}]"


def _cell(x: Any) -> str:
    """A table cell: metric dicts as above, floats with 3 decimals, ints as they are, None as empty."""
    if x is None:
        return ""
    if isinstance(x, dict):
        return format_metric(x)
    if isinstance(x, numbers.Integral):  # counts read better without decimals
        return str(x)
    if isinstance(x, numbers.Real):
        return _fmt(float(x), 3)
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _split_key(key: str, modes: list[str]) -> tuple[str, str]:
    """ "<mode>/<metric>" → (mode, metric). Known modes are matched first, so a metric name may contain "/"."""
    for mode in sorted(modes, key=len, reverse=True):
        if key.startswith(mode + "/"):
            return mode, key[len(mode) + 1 :]
    mode, _, metric = key.partition("/")
    return mode, metric


def _by_metric(results: dict) -> tuple[list[str], dict[str, dict[str, dict]]]:
    """Modes in order (results["modes"], then any others seen in the keys) and {metric: {mode: ci dict}}."""
    modes = list(results.get("modes", []))
    table: dict[str, dict[str, dict]] = {}
    for key, metric in results.get("metrics", {}).items():
        mode, name = _split_key(key, modes)
        if mode not in modes:
            modes.append(mode)
        table.setdefault(name, {})[mode] = metric
    return modes, table


def markdown_table(results: dict) -> str:
    """One row per metric (in order of first appearance), one column per mode; empty cells where a mode lacks it."""
    modes, table = _by_metric(results)
    heading = (
        f"### {results.get('task', '?')} · {results.get('model', '?')} · "
        f"N={results.get('n_items', '?')} · seed {results.get('seed', '?')}"
    )
    rows = [[_cell(name)] + [_cell(per_mode.get(mode)) for mode in modes] for name, per_mode in table.items()]
    grouped = any(isinstance(m, dict) and "groups" in m for m in results.get("metrics", {}).values())
    note = CI_NOTE_GROUPED if grouped else CI_NOTE
    return "\n".join([heading, "", *_table(["metric", *modes], rows), "", note]) + "\n"


def compare_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table with the given (key, header) columns; cells may be numbers, strings or metric dicts."""
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    return "\n".join(_table([header for _, header in columns], body)) + "\n"


# ---------------------------------------------------------------- plots


def new_figure(width: float, height: float):
    """A matplotlib figure on the Agg canvas: no display, no pyplot state shared between callers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: PathLike) -> None:
    """Render ``fig`` as PNG and write it atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_atomic(path, buf.getvalue())


def plot_token_deltas(deltas: list[float], path: PathLike, title: str) -> None:
    """Histogram of per-token Δ log-prob with a line at 0 and the mean; writes a "no tokens" PNG when empty."""
    finite = [float(d) for d in deltas if d is not None and math.isfinite(d)]
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    if not finite:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no tokens", ha="center", va="center", fontsize=14, transform=ax.transAxes)
        ax.set_title(title)
    else:
        mean = sum(finite) / len(finite)
        ax.hist(finite, bins=min(80, max(10, int(math.sqrt(len(finite))))), color="#4c72b0", alpha=0.8)
        ax.axvline(0.0, color="black", linewidth=1, label="0")
        ax.axvline(mean, color="#c44e52", linestyle="--", linewidth=1.5, label=f"mean {mean:+.3f}")
        ax.set_title(f"{title}\nmean Δ = {mean:+.3f} nats over {len(finite)} tokens")
        ax.set_xlabel("Δ log-prob per target token (nats)")
        ax.set_ylabel("tokens")
        ax.legend()
    fig.tight_layout()
    save_png(fig, path)


def _error_bar(metric: dict) -> tuple[float, float]:
    """(below, above) distances to the interval ends; 0 where the interval is missing."""
    value, low, high = (_num(metric.get(k)) for k in ("value", "ci_low", "ci_high"))
    below, above = value - low, high - value
    return (max(below, 0.0) if math.isfinite(below) else 0.0, max(above, 0.0) if math.isfinite(above) else 0.0)


def plot_accuracy(results: dict, path: PathLike, metric_names: tuple[str, ...] = DEFAULT_PLOT_METRICS) -> bool:
    """Grouped bars (one group per metric present, one bar per mode) with CI error bars; False if none present."""
    modes, table = _by_metric(results)
    names = [name for name in metric_names if name in table]
    if not names:
        return False
    modes = [mode for mode in modes if any(mode in table[name] for name in names)]
    fig = new_figure(min(16.0, max(5.0, 1.5 + 0.5 * len(names) * len(modes))), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs, ys, errs = [], [], []
        for g, name in enumerate(names):
            metric = table[name].get(mode)
            if metric is not None:
                xs.append(g - 0.4 + width * (i + 0.5))
                ys.append(_num(metric.get("value")))
                errs.append(_error_bar(metric))
        below, above = zip(*errs, strict=True) if errs else ((), ())
        ax.bar(xs, ys, width=width, yerr=[below, above], capsize=3, label=mode)
    ax.set_xticks(range(len(names)), names)
    ax.set_title(f"{results.get('task', '')} · {results.get('model', '')} (N={results.get('n_items', '?')})")
    ax.set_ylabel("value (95% bootstrap CI)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_png(fig, path)
    return True


# ---------------------------------------------------------------- html

PLOTS = ("accuracy.png", "token_deltas.png")  # report.html shows these first, then any other PNG in plots/


def cell_html(x: Any) -> str:
    """An HTML table cell's content: like the markdown cells, with a metric's interval in a grey ``ci`` span."""
    if isinstance(x, dict) and "ci_low" in x and "ci_high" in x:
        value, _, interval = format_metric(x).partition(" ")
        return f'{html.escape(value)} <span class="ci">{html.escape(interval)}</span>'
    return html.escape(x if isinstance(x, str) else _cell(x))


def _html_table(header: list[str], rows: list[list[str]], css_class: str, numeric_from: int = 1) -> str:
    """``rows`` hold HTML already escaped; cells from ``numeric_from`` on are numbers (no wrapping)."""
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = [f'<th scope="row">{row[0]}</th>']
        cells += [
            f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>" for i, c in enumerate(row[1:], 1)
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def results_html(results: dict) -> str:
    """``markdown_table`` as HTML: the heading line, one row per metric, one column per mode, the interval note."""
    modes, table = _by_metric(results)
    heading = (
        f"{results.get('task', '?')} · {results.get('model', '?')} · "
        f"N={results.get('n_items', '?')} · seed {results.get('seed', '?')}"
    )
    rows = [
        [html.escape(name)] + [cell_html(per_mode.get(mode)) for mode in modes] for name, per_mode in table.items()
    ]
    grouped = any(isinstance(m, dict) and "groups" in m for m in results.get("metrics", {}).values())
    return "\n".join(
        [
            f'<p class="note">{html.escape(heading)}</p>',
            _html_table(["metric", *modes], rows, "results"),
            f'<p class="note">{html.escape(CI_NOTE_GROUPED if grouped else CI_NOTE)}</p>',
        ]
    )


def compare_table_html(rows: list[dict], columns: list[tuple[str, str]], links: list[str] | None = None) -> str:
    """``compare_table`` as HTML; ``links`` (one per row, relative URLs) turn the first column into links."""
    body = []
    for i, row in enumerate(rows):
        first = html.escape(str(row.get(columns[0][0], "")))
        if links and links[i]:
            first = f'<a href="{html.escape(links[i])}">{first}</a>'
        body.append([first] + [cell_html(row.get(key)) for key, _ in columns[1:]])
    return _html_table([header for _, header in columns], body, "results")


def image_html(path: PathLike, alt: str) -> str:
    """An ``<img>`` holding the PNG at ``path`` as a data URI, so the page stays one file."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'


def _plot_files(folder: Path) -> list[Path]:
    found = sorted((folder / "plots").glob("*.png")) if (folder / "plots").is_dir() else []
    first = [p for name in PLOTS for p in found if p.name == name]
    return first + [p for p in found if p not in first]


def _summary_html(results: dict | None, folder: Path) -> list[str]:
    """The report's top: the results table, then every plot in ``folder/plots``."""
    parts = []
    if results is not None:
        parts += ['<h2 id="results">Results</h2>', results_html(results)]
    plots = _plot_files(folder)
    if plots:
        images = [image_html(p, f"plots/{p.name}") for p in plots]
        parts += ['<h2 id="plots">Plots</h2>', '<div class="plots">', *images, "</div>"]
    return parts


def _read_results(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_CONTEXT_CHARS = 600
_GREEN, _RED = (0, 150, 0), (210, 0, 0)
_BLACK, _WHITE = (0, 0, 0), (255, 255, 255)

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #222;
       background: #fff; }
.item { border: 1px solid #ccc; border-radius: 6px; padding: 0.6rem 1rem; margin: 1.2rem 0; }
.item h2 { font-size: 1rem; margin: 0.2rem 0 0.6rem; }
.text { font-family: ui-monospace, monospace; font-size: 0.9rem; white-space: pre-wrap; word-break: break-word; }
.context { color: #666; }
.thought { border: 1px dashed #6a4fc4; background: #f4f0ff; border-radius: 4px; padding: 0.3rem 0.6rem;
           margin: 0.5rem 0; }
.label { font-family: system-ui, sans-serif; font-size: 0.75rem; color: #6a4fc4; font-weight: bold; }
.copy { font-family: system-ui, sans-serif; font-size: 0.75rem; color: #fff; background: #b35900; border-radius: 3px;
        padding: 0 0.3rem; margin-left: 0.4rem; font-weight: bold; }
.target { margin-top: 0.4rem; }
.nl { opacity: 0.6; }
.note { font-size: 0.85rem; color: #555; margin-top: 0.5rem; }
.legend { border: 1px solid #ddd; background: #fafafa; padding: 0.5rem 1rem; border-radius: 6px; margin: 0.6rem 0; }
.passage { line-height: 1.7; }
.mark { position: relative; display: inline-block; width: 3px; height: 1.05em; padding: 0 2px;
        background: #6a4fc4; background-clip: content-box; vertical-align: text-bottom; cursor: pointer; }
.mark.gain { background-color: #2e7d32; }
.mark:hover, .mark:focus { background-color: #e07b00; outline: none; }
.mark .tip { display: none; position: absolute; left: 0; top: 1.3em; z-index: 10; width: max-content;
             max-width: 28rem; padding: 0.3rem 0.6rem; border: 1px dashed #6a4fc4; border-radius: 4px;
             background: #f4f0ff; color: #222; font-size: 0.8rem; white-space: pre-wrap; cursor: auto; }
.mark:hover .tip, .mark:focus .tip, .mark:focus-within .tip { display: block; }
table.results { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
table.results th, table.results td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left;
                                     vertical-align: top; }
table.results thead th { background: #f0f0f0; }
table.results td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.ci { color: #666; font-size: 0.85em; }
.plots img { display: block; max-width: 100%; height: auto; margin: 0.6rem 0; border: 1px solid #eee; }
"""


def _linear(channel: float) -> float:
    c = channel / 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def luminance(rgb: tuple[float, float, float]) -> float:
    """WCAG relative luminance of an sRGB colour (0-255 channels)."""
    r, g, b = (_linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """WCAG contrast ratio of two colours, 1 to 21 (4.5 is the AA level for body text)."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _over_white(rgb: tuple[int, int, int], alpha: float) -> tuple[float, float, float]:
    return tuple(alpha * c + (1 - alpha) * 255 for c in rgb)  # type: ignore[return-value]


def _token_style(delta: float | None) -> str:
    """Green when the thought raised the token's log-prob, red when it lowered it; strongest at |Δ| >= 2 nats. The
    text is black or white, whichever contrasts more with the cell (at least 4.5:1 at every strength)."""
    if delta is None or not math.isfinite(delta) or delta == 0:
        return ""
    rgb = _GREEN if delta > 0 else _RED
    alpha = round(min(abs(delta) / 2, 1.0), 3)
    cell = _over_white(rgb, alpha)
    text = "#fff" if contrast_ratio(cell, _WHITE) > contrast_ratio(cell, _BLACK) else "#000"
    r, g, b = rgb
    return f"background-color: rgba({r}, {g}, {b}, {alpha:.3f}); color: {text}"


def _token_html(text: str, delta: float | None, plain_tip: str = "Δ n/a") -> str:
    shown = html.escape(text).replace("\n", '<span class="nl">↵</span>\n')  # a coloured newline must stay visible
    tip = plain_tip if delta is None or not math.isfinite(delta) else f"Δ {delta:+.3f}"
    style = _token_style(delta)
    style_attr = f' style="{style}"' if style else ""
    return f'<span class="tok" title="{html.escape(tip)}"{style_attr}>{shown}</span>'


def _item_html(item: dict) -> str:
    context = item.get("context") or ""
    if len(context) > _CONTEXT_CHARS:
        context = "…" + context[-_CONTEXT_CHARS:]
    parts = [
        '<div class="item">',
        f"<h2>{html.escape(str(item.get('title', '')))}</h2>",
        f'<div class="text context">{html.escape(context)}</div>',
    ]
    thought = item.get("thought")
    if thought is not None:
        label = f'<div class="label">thought{_copy_badge(item.get("copies"))}</div>'
        parts.append(f'<div class="thought">{label}<div class="text">{html.escape(thought)}</div></div>')
    tokens = "".join(_token_html(str(text), delta) for text, delta in item.get("tokens", []))
    parts.append(f'<div class="text target">{tokens}</div>')
    if item.get("note"):
        parts.append(f'<div class="note">{html.escape(str(item["note"]))}</div>')
    parts.append("</div>")
    return "\n".join(parts)


COPY_LABELS = {"first": "contains y_1", "target": "copies the target"}


def _copy_badge(copies: str | None) -> str:
    """A badge for a thought that contains the first target token (``first``) or the whole target (``target``)."""
    if copies not in COPY_LABELS:
        return ""
    return f' <span class="copy" title="copy gauge">{COPY_LABELS[copies]}</span>'


def _mark_html(mark: dict) -> str:
    """A thought position: a small bar; hovering or clicking (focus) it shows the thought and its reward."""
    thought, reward = mark.get("thought"), mark.get("reward")
    if thought is None:
        body = "no sampled thought (only the null thought was scored)"
    else:
        badge = _copy_badge(mark.get("copies"))
        body = f'<span class="label">best thought, reward {reward:+.3f}{badge}</span>\n{html.escape(thought)}'
    gain = " gain" if reward is not None and reward > 0 else ""
    return f'<span class="mark{gain}" tabindex="0" aria-label="thought"><span class="tip">{body}</span></span>'


def _passage_html(passage: dict) -> str:
    """One window as running text: a marker before each thought position's first true token, every token
    coloured by Δ log-prob after the nearest thought before it (plain where no thought predicts it)."""
    marks: dict[int, list[dict]] = {}
    for mark in passage.get("marks", []):
        marks.setdefault(int(mark["at"]), []).append(mark)
    body = []
    for i, (text, delta) in enumerate(passage.get("tokens", [])):
        body += [_mark_html(m) for m in marks.pop(i, [])]
        body.append(_token_html(str(text), delta, "no thought predicts this token"))
    body += [_mark_html(m) for at in sorted(marks) for m in marks[at]]  # positions past the last token
    parts = [
        '<div class="item">',
        f"<h2>{html.escape(str(passage.get('title', '')))}</h2>",
        f'<div class="text passage">{"".join(body)}</div>',
    ]
    if passage.get("note"):
        parts.append(f'<div class="note">{html.escape(str(passage["note"]))}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def _swatches() -> str:
    return " ".join(_token_html(f" {d:+g} ", d) for d in (-2.0, -1.0, -0.25, 0.25, 1.0, 2.0))


def _legend_html() -> str:
    return (
        '<div class="legend">Target tokens are coloured by Δ log-prob (thought minus null thought): '
        '<span style="color: rgb(0, 120, 0)">green</span> = the thought helped, '
        '<span style="color: rgb(190, 0, 0)">red</span> = it hurt; colour strength grows with |Δ| up to 2 nats. '
        f'Hover a token for its Δ. <span class="text">{_swatches()}</span> '
        "The grey text is the end of the context; the dashed box is the thought. "
        f"{_copy_badge('first')} / {_copy_badge('target')}: the thought's tokens contain the first target token y_1 / "
        "the whole target as one run (copy gauge).</div>"
    )


def _passage_legend_html() -> str:
    return (
        '<div class="legend"><b>Passages.</b> Each window of held-out text is shown whole. A '
        '<span class="mark" aria-hidden="true"></span> bar marks a thought position (the thought is written '
        "there, before the next token); hover or click it to see the best of its sampled thoughts by reward and "
        "that reward (green bar: reward above 0). Every true token is coloured by Δ log p = log p(token | the "
        "thought before it) − log p(token | the null thought), using the nearest thought position before the token "
        "that predicts it (within the n tokens a thought is scored on); tokens no thought predicts stay plain. "
        f'Hover a token for its Δ. <span class="text">{_swatches()}</span></div>'
    )


def html_report(
    items: list[dict],
    path: PathLike,
    title: str,
    passages: list[dict] | None = None,
    results: dict | None = None,
) -> None:
    """A self-contained HTML page (inline CSS, no JS): the results table and the plots on top, then ``passages``
    (text: whole windows with a marker per thought position), then context, thought and Δ-coloured target per item.

    ``results`` defaults to the ``results.json`` beside ``path``, and the plots are the PNGs in ``plots/`` beside it
    (embedded as data URIs), so the page shows what its evaluation folder holds.
    A passage is ``{"title", "tokens": [[text, Δ or None], ...], "marks": [{"at": token index, "thought": text or
    None, "reward": float or None, "copies": "first" | "target" | None}, ...], "note"}``; an item is ``{"title",
    "context", "thought", "copies", "tokens", "note"}`` (``copies``: the copy-gauge badge of the thought, optional).
    """
    folder = Path(path).parent
    sections = _summary_html(results if results is not None else _read_results(folder), folder)
    if passages:
        sections += ["<h2>Passages</h2>", _passage_legend_html(), *(_passage_html(p) for p in passages)]
        sections.append("<h2>Positions</h2>")
    elif sections:
        sections.append('<h2 id="items">Items</h2>')
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            *sections,
            _legend_html(),
            *(_item_html(item) for item in items),
            "</body></html>",
        ]
    )
    write_atomic(path, (page + "\n").encode("utf-8"))


# ---------------------------------------------------------------- compare.html

_THOUGHT_CHARS = 280  # a longer best thought shows its start; the rest opens in a <details>

_COMPARE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fff; }
h1 { font-size: 1.3rem; } h2 { font-size: 1.1rem; margin-top: 1.6rem; }
.note { font-size: 0.85rem; color: #555; }
.ci { color: #666; font-size: 0.85em; }
table.results { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
table.results th, table.results td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
table.results thead th { background: #f0f0f0; }
table.results td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.items { border-collapse: separate; border-spacing: 0; table-layout: fixed; width: 100%; font-size: 0.85rem; }
table.items th, table.items td { border-right: 1px solid #ddd; border-bottom: 1px solid #ddd; padding: 0.4rem 0.5rem;
                                 vertical-align: top; text-align: left; overflow-wrap: anywhere; }
table.items thead th { position: sticky; top: 0; z-index: 2; background: #eef0f5; border-bottom: 2px solid #99a;
                       font-size: 0.9rem; }
table.items tbody tr:nth-child(even) th, table.items tbody tr:nth-child(even) td { background: #fafafa; }
table.items tbody th { font-weight: normal; }
.item-title { font-weight: bold; }
.question, .thought { white-space: pre-wrap; }
.thought { font-family: ui-monospace, monospace; font-size: 0.8rem; background: #f4f0ff;
           border-left: 3px solid #6a4fc4; padding: 0.2rem 0.4rem; margin-top: 0.3rem; }
.empty { color: #888; font-style: italic; }
.gold { color: #555; margin-top: 0.3rem; }
.reward { font-variant-numeric: tabular-nums; font-weight: bold; white-space: nowrap; }
.reward.pos { color: #1b5e20; } .reward.neg { color: #b71c1c; }
.verdict { margin-left: 0.4rem; padding: 0 0.3rem; border-radius: 3px; white-space: nowrap; }
.verdict.right { background: #dff2df; color: #1b5e20; } .verdict.wrong { background: #fbe0e0; color: #b71c1c; }
.verdict.na { color: #666; }
.unfinished { color: #8a5a00; font-size: 0.75rem; margin-left: 0.3rem; white-space: nowrap; }
td.top { box-shadow: inset 3px 0 0 #2e7d32; }
details summary { cursor: pointer; color: #444; }
details.others { margin-top: 0.3rem; font-size: 0.78rem; }
details.others ol { margin: 0.2rem 0 0; padding-left: 1.3rem; }
details.others li { margin: 0.15rem 0; }
"""


def _verdict_html(right: bool | None, answer: str | None) -> str:
    said = f" ({html.escape(answer)})" if answer is not None else ""
    if right is None:
        return f'<span class="verdict na">no answer checked{said}</span>' if said else ""
    word = "✓ right" if right else "✗ wrong"
    return f'<span class="verdict {"right" if right else "wrong"}">{word}{said}</span>'


def _reward_html(reward: float) -> str:
    shown = round(reward, 3)  # the colour follows the number shown: -0.0004 is no loss
    sign = "pos" if shown > 0 else "neg" if shown < 0 else "zero"
    return f'<span class="reward {sign}">reward {reward:+.3f}</span>'


def _thought_text_html(text: str) -> str:
    """The thought, escaped; a long one shows its start and opens in full."""
    if not text.strip():
        return '<div class="thought empty">(empty thought)</div>'
    if len(text) <= _THOUGHT_CHARS:
        return f'<div class="thought">{html.escape(text)}</div>'
    head = html.escape(text[:_THOUGHT_CHARS].rstrip() + " …")
    full = f'<div class="thought">{html.escape(text)}</div>'
    return f'<details class="long"><summary class="thought">{head}</summary>{full}</details>'


def _compare_cell_html(cell: dict | None, top: bool) -> str:
    """One template's best thought for one item: reward, right/wrong, the thought, and every thought folded."""
    if cell is None:
        return '<td class="missing"><span class="empty">not evaluated</span></td>'
    right = cell.get("right")
    attrs = f' data-reward="{cell["reward"]:.6f}" data-right="{"" if right is None else str(bool(right)).lower()}"'
    parts = [_reward_html(cell["reward"]), _verdict_html(right, cell.get("answer"))]
    if cell.get("finished") is False:
        parts.append('<span class="unfinished">unfinished</span>')
    parts.append(_thought_text_html(cell["thought"]))
    others = cell.get("thoughts") or []
    if len(others) > 1:
        rows = []
        for t in others:
            text = html.escape(t["text"]) if t["text"].strip() else '<span class="empty">(empty)</span>'
            rows.append(f"<li>{_reward_html(t['reward'])}{_verdict_html(t.get('right'), t.get('answer'))} {text}</li>")
        parts.append(
            f'<details class="others"><summary>all {len(others)} thoughts</summary><ol>{"".join(rows)}</ol></details>'
        )
    return f'<td class="{"cell top" if top else "cell"}"{attrs}>{"".join(parts)}</td>'


def _compare_item_html(item: dict, n_templates: int) -> str:
    head = [f'<div class="item-title">{html.escape(str(item["title"]))}</div>']
    if item.get("question"):
        head.append(f'<div class="question">{html.escape(str(item["question"]))}</div>')
    if item.get("gold") is not None:
        head.append(f'<div class="gold">gold: <b>{html.escape(str(item["gold"]))}</b></div>')
    cells = item["cells"] + [None] * (n_templates - len(item["cells"]))
    rewards = [c["reward"] for c in cells if c is not None]
    best = max(rewards) if len(set(rewards)) > 1 else None  # a row where all templates tie marks none
    tds = [_compare_cell_html(c, best is not None and c is not None and c["reward"] == best) for c in cells]
    anchor = f' id="{html.escape(str(item["anchor"]))}"' if item.get("anchor") else ""
    return f'<tr{anchor}><th scope="row">{"".join(head)}</th>{"".join(tds)}</tr>'


def compare_html(
    path: PathLike,
    title: str,
    summary: str,
    templates: list[str],
    items: list[dict],
    notes: list[str] = (),
) -> None:
    """``compare.html``: ``summary`` (an HTML table, e.g. ``compare_table_html``) on top, then one row per item and
    one column per template (equal widths, a header that stays on screen while scrolling).

    An item is ``{"title", "question", "gold", "anchor" (the row's id), "cells": [cell or None per template]}``;
    a cell is ``{"thought", "reward", "right": bool or None, "answer": str or None, "finished", "thoughts": [{"text",
    "reward", "right", "answer"}, ...]}``, the best thought by reward first. The highest reward of a row is marked
    (``td.top``; a row where all templates tie marks none).
    """
    first = 22 if len(templates) <= 4 else 16  # % of the width for the item column; the templates share the rest
    cols = [f'<col style="width: {first}%">'] + [f'<col style="width: {(100 - first) / len(templates):.3f}%">'] * len(
        templates
    )
    head = "".join(f'<th scope="col">{html.escape(name)}</th>' for name in ["item", *templates])
    min_width = 16 + 15 * len(templates)  # rem: wide comparisons scroll sideways instead of squeezing each column
    rows = "\n".join(_compare_item_html(item, len(templates)) for item in items)
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{_COMPARE_CSS}table.items {{ min-width: {min_width}rem; }}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            '<h2 id="summary">Summary</h2>',
            summary,
            *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
            f'<h2 id="items">Items ({len(items)})</h2>',
            '<p class="note">Each cell: the template\'s best thought by reward (log p of the gold answer after the '
            "thought minus after the null thought), whether the answer after it was right, and all its thoughts "
            "folded below. A green left edge marks the row's highest reward.</p>",
            f'<table class="items"><colgroup>{"".join(cols)}</colgroup><thead><tr>{head}</tr></thead>',
            f"<tbody>\n{rows}\n</tbody></table>",
            "</body></html>",
        ]
    )
    write_atomic(path, (page + "\n").encode("utf-8"))
