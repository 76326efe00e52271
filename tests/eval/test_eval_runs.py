"""``thinkrl eval`` end to end on tiny byte-level models and small data folders written by the tests."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import CSQA_ROWS, GSM8K_ROWS, TINY_BYTE, write_eval_data

from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.eval.likelihood import answer_token_ids
from thinkrl.eval.runner import EvalOptions, Evaluator, result_view
from thinkrl.eval.setup import EvalSetup
from thinkrl.models.roles import build_roles


def _setup(tmp_path, *extra):
    torch.manual_seed(0)
    cfg = load_config("configs/default.yaml", [*TINY_BYTE, f"data.data_dir={write_eval_data(tmp_path)}", *extra])
    return EvalSetup(cfg, build_roles(cfg), None)


def _run(setup, out, **kw):
    opts = EvalOptions(model="tiny", output_dir=str(out), **{"batch_size": 2, "max_new_tokens": 4, **kw})
    evaluator = Evaluator(opts, setup)
    return evaluator, evaluator.run()


def test_gsm8k_likelihood_score_matches_hand_computation(tmp_path):
    setup = _setup(tmp_path)
    evaluator, results = _run(setup, tmp_path / "ev", task="gsm8k", thoughts="none")
    model, tok = setup.roles.model("interpreter"), setup.roles.tokenizer
    digits = set(answer_token_ids(tok, "digits").tolist())
    assert digits == {tok.convert_tokens_to_ids(str(d)) for d in range(10)}
    scores = []
    for item, rec in zip(evaluator.items, evaluator.records):
        ids = item.context + item.targets[0]
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        score = 1.0
        assert tok.decode(item.targets[0][:1]) == " "
        for j, y in enumerate(item.targets[0][1:], 1):  # " 750": the space is the prompt's side, not scored
            p = probs[len(item.context) - 1 + j]
            score *= float(p[y] / p[sorted(digits)].sum())
        assert rec["none"]["likelihood"] == pytest.approx(score, rel=1e-4)
        scores.append(score)
    metric = results["metrics"]["none/likelihood_score"]
    assert metric["value"] == pytest.approx(sum(scores) / len(scores), rel=1e-4)
    assert metric["n"] == len(GSM8K_ROWS)
    assert {r["gold"] for r in evaluator.records} == {"7", "24", "750", "5", "42"}


def test_csqa_letter_scoring_picks_the_planted_answer(tmp_path):
    setup = _setup(tmp_path, "model.default.scratch.hidden_size=64")
    model = setup.roles.model("interpreter")
    evaluator = Evaluator(
        EvalOptions(task="csqa", model="tiny", thoughts="none", output_dir=str(tmp_path / "x")), setup
    )
    before = [evaluator.items[i] for i in range(len(CSQA_ROWS))]
    # Teach the model each question's gold letter (and nothing about the others).
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for it in before:
            gold = it.targets[it.info["labels"].index(it.gold)]
            ids = torch.tensor([it.context + gold])
            loss = torch.nn.functional.cross_entropy(
                model(ids).logits[0, len(it.context) - 1 : -1].float(), torch.tensor(gold)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    _, results = _run(setup, tmp_path / "ev", task="csqa", thoughts="none,null,sampled:2", generate=False)
    m = results["metrics"]
    assert m["none/letter_accuracy"]["value"] == 1.0
    assert m["none/likelihood_score"]["value"] > 0.9
    assert 0.0 <= m["sampled:2/null_rate"]["value"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "ev" / "items.jsonl").read_text().splitlines()]
    assert [r["labels"][int(torch.tensor(r["none"]["letter_logp"]).argmax())] for r in records] == [
        r["gold"] for r in records
    ]


@pytest.mark.parametrize(
    "task,passes,rows_per_item",
    [  # per position: the context, then the answer(s) (CSQA: 5 letters + 5 texts); parallel: one read per window
        ("gsm8k", "per_position", 2),
        ("csqa", "per_position", 2 + 10),
        ("text", "per_position", 2),
        ("text", "parallel", None),
    ],
)
def test_thoughts_none_computes_no_thought_row(tmp_path, task, passes, rows_per_item):
    """``--thoughts none`` runs the base model alone (not even the null thought's row), with the numbers ``none``
    gets beside the null thought, and records and metrics without a ``null`` entry."""
    text = tmp_path / "held_out.txt"
    text.write_text(HAMLET)
    extra = ("data.source=text", f"data.train_file={text}", "data.positions=every_k", "data.every_k=16")
    setup = _setup(tmp_path, f"rollout.thought_passes={passes}", *(extra if task == "text" else ()))
    rows: list[int] = []  # batch rows of every forward of the (one, shared) model
    count = lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0])  # noqa: E731
    handle = setup.roles.model("interpreter").register_forward_pre_hook(count, with_kwargs=True)
    try:
        kw = {"task": task, "generate": False, "limit": 4}
        alone, results = _run(setup, tmp_path / "none", thoughts="none", **kw)
        rows_alone, rows[:] = sum(rows), []
        both, results_both = _run(setup, tmp_path / "both", thoughts="none,null", **kw)
        rows_both = sum(rows)
    finally:
        handle.remove()
    windows = len({rec.get("doc") for rec in alone.records})
    assert rows_alone == (rows_per_item * 4 if rows_per_item else windows) < rows_both
    assert all("null" not in rec and "null" not in rec.get("logp", {}) for rec in alone.records)
    assert not any(key.startswith("null/") for key in results["metrics"])
    assert any(key.startswith("null/") for key in results_both["metrics"])
    for rec, ref in zip(alone.records, both.records):
        assert rec["id"] == ref["id"] and rec["target_tokens"] == ref["target_tokens"]
        got, want = (
            ({"logp": rec["logp"]["none"]}, {"logp": ref["logp"]["none"]})
            if task == "text"
            else (rec["none"], ref["none"])
        )
        assert set(got) == set(want)
        for key in want:
            assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), atol=1e-5), key
    none_metrics = {k: v for k, v in results_both["metrics"].items() if k.startswith("none/")}
    assert set(results["metrics"]) == set(none_metrics)
    for key, value in none_metrics.items():
        assert results["metrics"][key]["value"] == pytest.approx(value["value"], abs=1e-5), key


def _interrupt_second_batch(monkeypatch):
    """Make the evaluator stop with KeyboardInterrupt at its second batch; returns (call counter, original method)."""
    calls = {"n": 0}
    original = Evaluator._evaluate_batch

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Evaluator, "_evaluate_batch", interrupted)
    return calls, original


def test_interrupted_evaluation_resumes_to_the_same_results(tmp_path, monkeypatch):
    setup = _setup(tmp_path)
    kw = {"task": "gsm8k", "thoughts": "none,null,sampled:2", "limit": 5, "seed": 3}
    _, full = _run(setup, tmp_path / "full", **kw)

    calls, original = _interrupt_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "cut", **kw)
    assert len((tmp_path / "cut" / "items.jsonl").read_text().splitlines()) == 2  # the first batch survived
    assert not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(Evaluator, "_evaluate_batch", original)
    evaluator, resumed = _run(setup, tmp_path / "cut", **kw)
    assert calls["n"] == 2  # the rerun did not redo the first batch
    assert result_view(resumed) == result_view(full)
    written = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert written == json.loads((tmp_path / "full" / "results.json").read_text())
    for name in ("results.md", "report.html", "plots/token_deltas.png", "plots/accuracy.png"):
        assert (tmp_path / "cut" / name).stat().st_size > 0

    with pytest.raises(Exception, match="other settings"):  # a different slice never mixes into that folder
        _run(setup, tmp_path / "cut", **{**kw, "seed": 4})


def test_text_eval_reports_hard_tokens_and_null_rate(tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("the cat sat on the mat. " * 80)  # the last 10% (192 bytes) is held out
    setup = _setup(
        tmp_path,
        "data.source=text",
        f"data.train_file={text}",
        "data.positions=every_k",
        "data.every_k=16",
        "data.n_ahead=3",
        "rollout.null_thought=null/default",  # a phrase: its bytes hold letters of the text, so it copies some y_1
    )
    evaluator, results = _run(setup, tmp_path / "ev", task="text", thoughts="none,null,sampled:2", limit=6)
    m = results["metrics"]
    for mode in ("none", "null", "sampled:2"):
        assert m[f"{mode}/nll"]["n"] == 6 and f"{mode}/nll_hard" in m
    assert m["none/nll_hard"]["value"] >= m["none/nll"]["value"]  # the top decile of the base's NLL
    # null rate: the share of items.jsonl's items where no thought's reward (vs the null thought) is above 0
    items = [json.loads(line) for line in (tmp_path / "ev" / "items.jsonl").read_text().splitlines()]
    assert len(items) == 6
    rate = sum(max(t["reward"] for t in r["thoughts"]) <= 0 for r in items) / len(items)
    assert m["sampled:2/null_rate"]["value"] == pytest.approx(rate)
    assert m["sampled:2/null_rate"]["n"] == 6
    rec = evaluator.records[0]
    assert len(rec["logp"]["sampled"]) == 2 and len(rec["logp"]["null"]) == 3
    html = (tmp_path / "ev" / "report.html").read_text()
    assert "thought" in html and "rgba(" in html
    # Copy gauge: each thought's flags (the null phrase's too) are its ids against the item's target, the rates their
    # means; no thought copies nothing.
    copies = lambda z, y: (y[0] in z, any(z[s : s + len(y)] == y for s in range(len(z))))  # noqa: E731
    flags, null_flags, share = [], [], [0.0, 0.0]
    for rec, item in zip(items, evaluator.items):
        y = item.targets[0]
        null_flags.append(copies(evaluator.null_ids, y))
        assert (rec["null_copies"]["copies_first"], rec["null_copies"]["copies_target"]) == null_flags[-1]
        for t in rec["thoughts"]:
            flags.append(copies(t["ids"], y))
            assert (t["copies_first"], t["copies_target"]) == flags[-1]
            share[0] += max(t["reward"], 0) * flags[-1][0]
            share[1] += max(t["reward"], 0)
    for mode, rows in (("sampled:2", flags), ("null", null_flags)):
        assert m[f"{mode}/copy_rate"]["value"] == pytest.approx(sum(f for f, _ in rows) / len(rows))
        assert m[f"{mode}/copy_rate_target"]["value"] == pytest.approx(sum(w for _, w in rows) / len(rows))
    assert m["null/copy_rate"]["value"] > 0  # not a comparison of zeros
    assert m["sampled:2/reward_copy_share"]["value"] == pytest.approx(share[0] / share[1] if share[1] else 0.0)
    assert m["none/copy_rate"]["value"] == m["none/copy_rate_target"]["value"] == 0.0
    assert "none/reward_copy_share" not in m and "null/reward_copy_share" not in m
    assert "| copy_rate | 0.000" in (tmp_path / "ev" / "results.md").read_text()


HAMLET = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 30


def _text_setup(tmp_path, passes: str, *extra):
    """Windows of 32 + 3 bytes with a thought position every 4 bytes (8 per window) in the held-out 10%."""
    text = tmp_path / "hamlet.txt"
    text.write_text(HAMLET)
    return _setup(
        tmp_path,
        "data.source=text",
        f"data.train_file={text}",
        "data.positions=every_k",
        "data.every_k=4",
        "data.n_ahead=3",
        "data.context_len=32",
        f"rollout.thought_passes={passes}",
        *extra,
    )


TEXT_RUN = {"task": "text", "thoughts": "none,null,sampled:2", "limit": 20, "seed": 1, "batch_size": 8}


@pytest.mark.parametrize(
    "extra",
    [(), ("model.weight_groups=[A,B,A]", "head.form=gate", "reward.source=interpreter")],
    ids=["shared", "own-reasoner-gate"],
)
def test_text_eval_in_parallel_passes_matches_per_position(tmp_path, monkeypatch, extra):
    parallel, per_position = _text_setup(tmp_path, "parallel", *extra), _text_setup(tmp_path, "per_position", *extra)
    assert parallel.cfg.parallel_passes() and not per_position.cfg.parallel_passes()
    batches = []
    original = Evaluator._evaluate_batch

    def spy(self, batch):
        batches.append((self.parallel, [it.info["doc"] for it in batch]))
        return original(self, batch)

    monkeypatch.setattr(Evaluator, "_evaluate_batch", spy)
    ev_par, res_par = _run(parallel, tmp_path / "par", **TEXT_RUN)
    ev_pos, res_pos = _run(per_position, tmp_path / "pos", **TEXT_RUN)
    # The slice is whole windows (the last one cut short), the same items in both; parallel batches never split one.
    docs = [r["doc"] for r in ev_par.records]
    assert len(docs) == 20 and docs == sorted(docs) and len(set(docs)) == 3
    assert [(r["id"], r["doc"], r["slot"]) for r in ev_par.records] == [
        (r["id"], r["doc"], r["slot"]) for r in ev_pos.records
    ]
    par_docs = [set(d) for on, d in batches if on]
    assert len(par_docs) == 3 and all(not (a & b) for a, b in zip(par_docs, par_docs[1:]))
    # Same seeds, same thoughts; same NLLs, rewards and rates (up to float error), same intervals' units.
    assert [[t["text"] for t in r["thoughts"]] for r in ev_par.records] == [
        [t["text"] for t in r["thoughts"]] for r in ev_pos.records
    ]
    m_par, m_pos = res_par["metrics"], res_pos["metrics"]
    assert set(m_par) == set(m_pos)
    for mode in ("none", "null", "sampled:2"):
        for name in ("nll", "nll_hard"):
            assert f"{mode}/{name}" in m_par
    for key in m_par:
        assert m_par[key]["value"] == pytest.approx(m_pos[key]["value"], abs=1e-5), key
        assert (m_par[key]["n"], m_par[key]["groups"]) == (m_pos[key]["n"], m_pos[key]["groups"])
    assert m_par["none/nll"]["groups"] == 3
    rate = sum(max(t["reward"] for t in r["thoughts"]) <= 0 for r in ev_par.records) / len(ev_par.records)
    assert m_par["sampled:2/null_rate"]["value"] == pytest.approx(rate)
    assert "bootstrap over windows" in (tmp_path / "par" / "results.md").read_text()


def test_text_eval_in_parallel_passes_resumes_and_shows_passages(tmp_path, monkeypatch):
    setup = _text_setup(tmp_path, "auto")
    _, full = _run(setup, tmp_path / "full", **TEXT_RUN)
    calls, _ = _interrupt_second_batch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path / "cut", **TEXT_RUN)
    assert len((tmp_path / "cut" / "items.jsonl").read_text().splitlines()) == 8  # the first window survived
    evaluator, resumed = _run(setup, tmp_path / "cut", **TEXT_RUN)
    assert calls["n"] == 4  # the rerun did the two other windows only
    assert result_view(resumed) == result_view(full)
    # The passage view: each window once, one marker per thought position, holding its best thought.
    page = (tmp_path / "cut" / "report.html").read_text(encoding="utf-8")
    passages = page[page.index("<h2>Passages</h2>") : page.index("<h2>Positions</h2>")]
    assert passages.count('aria-label="thought"><span class="tip">') == len(evaluator.records) == 20
    assert passages.count("<h2>window ") == 3
    for rec in evaluator.records:
        best = max(rec["thoughts"], key=lambda t: t["reward"])
        assert f"reward {best['reward']:+.3f}" in passages
    assert "Δ log p" in passages and "rgba(" in passages


def test_cli_eval_and_compare_errors(tmp_path, capsys):
    data = write_eval_data(tmp_path)
    base = ["--config", "configs/default.yaml", "--task", "gsm8k", "--limit", "2", "--output"]
    over = [*TINY_BYTE, f"data.data_dir={data}"]
    assert main(["eval", *base, str(tmp_path / "e"), "--thoughts", "none,sampled:0", *over]) == 2
    assert "sampled:K" in capsys.readouterr().err
    text = ["eval", "--config", "configs/default.yaml", "--task", "text", "--text-file", "missing.txt", "--output"]
    assert main([*text, str(tmp_path / "t"), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thinkrl: error: --text-file missing.txt does not exist") and len(err.splitlines()) == 1
    assert "data.train_file" not in err
    broken = tmp_path / "prompts"
    (broken / "thinking").mkdir(parents=True)
    (broken / "thinking" / "bad.txt").write_text("{context} and {nope}")
    import thinkrl.prompts as prompts

    old = prompts.PROMPTS_DIR
    prompts.PROMPTS_DIR = broken
    try:
        code = main(["prompts", "compare", "thinking/bad", "thinking/bad", *base, str(tmp_path / "c"), *over])
    finally:
        prompts.PROMPTS_DIR = old
    err = capsys.readouterr().err.strip()
    assert code == 2 and "thinking/bad" in err and "nope" in err and len(err.splitlines()) == 1


def test_prompts_compare_puts_templates_side_by_side(tmp_path, capsys):
    data = write_eval_data(tmp_path)
    out = tmp_path / "cmp"
    templates = ["thinking/plain", "thinking/system", "thinking/math"]
    args = ["--config", "configs/default.yaml", "--task", "csqa", "--limit", "3", "--thoughts", "sampled:2"]
    code = main(["prompts", "compare", *templates, *args, "--output", str(out), *TINY_BYTE, f"data.data_dir={data}"])
    assert code == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| thinking/")]
    assert [line.split("|")[1].strip() for line in table] == templates
    saved = json.loads((out / "compare.json").read_text())
    assert [r["template"] for r in saved["rows"]] == templates
    for row in saved["rows"]:
        assert row["reward_mean"]["n"] == 3 and 0.0 <= row["null_rate"]["value"] <= 1.0
        assert len(row["samples"]) == 3
    # Same items and thought seeds for every template: only the reasoner's prompt differs.
    ids = [
        [json.loads(x)["id"] for x in (out / t.replace("/", "__") / "items.jsonl").read_text().splitlines()]
        for t in templates
    ]
    assert ids[0] == ids[1] == ids[2]


def test_eval_of_a_training_run_loads_its_newest_checkpoint(tiny_config, tmp_path):
    from thinkrl.eval.setup import load_setup
    from thinkrl.run.trainer import Trainer

    cfg = tiny_config("trainer.max_steps=2", "model.weight_groups=[A,B,A]", "head.form=gate")
    trainer = Trainer(cfg)
    trainer.train()
    run_dir = tmp_path / "run"
    setup = load_setup(str(run_dir), None, ["rollout.num_thoughts=2"])
    assert setup.checkpoint.name == "checkpoint-2"
    assert setup.cfg.model.weight_groups == ["A", "B", "A"] and setup.cfg.head.form == "gate"
    for group, model in trainer.roles.models.items():
        for (name, p), q in zip(model.state_dict().items(), setup.roles.models[group].state_dict().values()):
            assert torch.equal(p.cpu(), q.cpu()), name
    for p, q in zip(trainer.roles.head.parameters(), setup.roles.head.parameters()):
        assert torch.equal(p.cpu(), q.cpu())
    fresh = load_setup(None, str(run_dir / "config.yaml"), [])  # same recipe, untrained weights (on the CPU)
    assert any(
        not torch.equal(p.cpu(), q.cpu())
        for p, q in zip(fresh.roles.models["B"].parameters(), setup.roles.models["B"].parameters())
    )
    _, results = _run(setup, tmp_path / "ev", task="text", thoughts="none,null,sampled:2", limit=4)
    assert results["metrics"]["sampled:2/reward_mean"]["n"] == 4
