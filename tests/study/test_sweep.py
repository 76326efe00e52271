"""``thinkrl sweep`` and ``thinkrl aggregate``: grid parsing, study files from hand-made folders, a resumed sweep."""

import json
import math
from pathlib import Path

import pytest
from conftest import TINY

from thinkrl.cli import main
from thinkrl.config import load_config, to_yaml
from thinkrl.errors import ConfigError
from thinkrl.study.aggregate import aggregate, group_by_point, markdown, pooled_items, read_result
from thinkrl.study.sweep import parse_grid, plan, split_values, sweep, train_command


def test_commas_make_axes_and_brackets_do_not():
    assert split_values("0,0.05") == ["0", "0.05"]
    assert split_values("[A,B,C]") == ["[A,B,C]"]
    assert split_values("[A,A,A],[A,B,C]") == ["[A,A,A]", "[A,B,C]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    fixed, axes = parse_grid(["reward.length_penalty=0,0.05", "trainer.max_steps=40", "model.freeze=[base,head]"])
    assert fixed == ["trainer.max_steps=40", "model.freeze=[base,head]"]
    assert axes == [("reward.length_penalty", ["0", "0.05"])]
    with pytest.raises(ConfigError, match="sets trainer.seed per run"):
        parse_grid(["trainer.seed=1,2"])


def test_plan_names_a_folder_per_point_and_seed(tmp_path):
    runs, _, _ = plan(["reward.length_penalty=0,0.05", "learner.lr=1e-3,1e-2", "x.y=1"], [0, 1], tmp_path)
    assert [str(r.folder.relative_to(tmp_path)) for r in runs[:3]] == [
        "length_penalty=0/lr=1e-3/seed-0",
        "length_penalty=0/lr=1e-3/seed-1",
        "length_penalty=0/lr=1e-2/seed-0",
    ]
    assert runs[1].overrides == [
        "x.y=1",
        "reward.length_penalty=0",
        "learner.lr=1e-3",
        "trainer.seed=1",
        f"trainer.output_dir={tmp_path / 'length_penalty=0/lr=1e-3/seed-1'}",
    ]
    shared, _, _ = plan(["rollout.batch_positions=1,2", "trainer.batch_positions=4,8"], [0], tmp_path)
    assert shared[0].label == "rollout.batch_positions=1/trainer.batch_positions=4"  # same tail: full keys
    assert [r.label for r in plan([], [3], tmp_path)[0]] == ["all"]
    assert train_command("accelerate launch --config_file a.yaml", "c.yaml", ["k=v"]) == [
        *["accelerate", "launch", "--config_file", "a.yaml", "-m", "thinkrl", "train", "--config", "c.yaml", "k=v"]
    ]


def _fake_run(folder: Path, seed: int, null: float, thought: float, rewards: list[float], lr: float = 1e-3) -> Path:
    """A finished run folder as the trainer writes it, with chosen numbers."""
    folder.mkdir(parents=True)
    cfg = load_config(None, [f"trainer.seed={seed}", f"trainer.output_dir={folder}", f"learner.lr={lr}"])
    (folder / "config.yaml").write_text(to_yaml(cfg))
    evals = {"nll_null": null, "nll_thought": thought, "null_rate": 0.5, "mix_weight": None, "positions": 8}
    evals["copy_rate"] = 0.1 * seed
    summary = {"initial_eval": {**evals, "nll_thought": null}, "final_eval": evals, "steps": len(rewards)}
    (folder / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": 0, "eval/nll_null": null, "eval/nll_thought": null}]
    lines += [
        {"step": i + 1, "train/reward": r, "train/null_rate": 0.5, "train/copy_rate": 0.25}
        for i, r in enumerate(rewards)
    ]
    lines += [{"step": len(rewards), "eval/nll_null": null, "eval/nll_thought": thought}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_aggregate_run_folders_by_hand(tmp_path, capsys):
    # final nll_gain = null - thought = 0.1, 0.2, 0.6 → mean 0.3, sd 0.264575, 95% t-interval ±0.657241
    seeds = [_fake_run(tmp_path / f"s{s}", s, 2.0, 2.0 - gain, [s, s + 1.0]) for s, gain in enumerate((0.1, 0.2, 0.6))]
    other = _fake_run(tmp_path / "other", 0, 2.0, 1.5, [0.0, 0.0], lr=0.01)
    points = group_by_point([read_result(f) for f in [*seeds, other]])
    assert list(points) == ["learner.lr=0.001", "learner.lr=0.01"]
    study = aggregate(points)
    first = study["points"][0]
    gain = first["metrics"]["final_eval/nll_gain"]
    assert (first["n"], first["seeds"]) == (3, [0, 1, 2])
    assert gain["mean"] == pytest.approx(0.3) and gain["sd"] == pytest.approx(math.sqrt(0.07))
    assert (gain["ci_low"], gain["ci_high"]) == pytest.approx((0.3 - 0.657241, 0.3 + 0.657241), abs=1e-6)
    assert first["metrics"]["initial_eval/nll_gain"]["mean"] == 0.0
    assert "final_eval/positions" not in first["metrics"] and first["metrics"]["final_eval/mix_weight"]["n"] == 0
    reward = first["curves"]["reward"]  # seeds' rewards at steps 1, 2: (0,1,2) and (1,2,3)
    assert reward["steps"] == [1, 2] and reward["mean"] == [1.0, 2.0] and reward["sd"] == [1.0, 1.0]
    assert first["curves"]["nll_gain"]["steps"] == [0, 2]
    copy_rate = first["metrics"]["final_eval/copy_rate"]  # seeds 0, 1, 2: 0, 0.1, 0.2
    assert copy_rate["mean"] == pytest.approx(0.1) and copy_rate["sd"] == pytest.approx(0.1)
    assert first["curves"]["copy_rate"]["mean"] == [0.25, 0.25]

    assert main(["aggregate", *map(str, seeds), str(other), "--out", str(tmp_path / "study")]) == 0
    md = (tmp_path / "study" / "study.md").read_text()
    assert "| nll_gain | 0.3000 ± 0.2646 [-0.3572, 0.9572] | 0.5000 |" in md
    assert "Student-t" in md and "## final_eval" in md
    assert json.loads((tmp_path / "study" / "study.json").read_text())["points"][1]["n"] == 1
    for curve in ("reward", "nll_gain", "null_rate", "copy_rate"):
        assert (tmp_path / "study" / "plots" / f"{curve}.png").stat().st_size > 1000


def test_aggregate_eval_folders_across_seeds(tmp_path):
    folders = []
    for seed, acc in enumerate((0.5, 0.6, 0.7)):
        folder = tmp_path / f"eval{seed}"
        folder.mkdir()
        metrics = {
            "sampled:4/accuracy": {"value": acc, "ci_low": 0, "ci_high": 1, "n": 10},
            "sampled:4/copy_rate": {"value": acc - 0.4, "ci_low": 0, "ci_high": 1, "n": 10},
        }
        (folder / "results.json").write_text(json.dumps({"task": "gsm8k", "seed": seed, "metrics": metrics}))
        settings = {"task": "gsm8k", "model": f"runs/s{seed}", "seed": seed, "limit": 10}
        (folder / "settings.json").write_text(json.dumps(settings))
        folders.append(folder)
    points = group_by_point([read_result(f) for f in folders])
    assert list(points) == ["all"]
    acc = aggregate(points)["points"][0]["metrics"]["sampled:4/accuracy"]
    assert acc["mean"] == pytest.approx(0.6) and acc["sd"] == pytest.approx(0.1)
    assert acc["ci_high"] - 0.6 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), abs=1e-6)
    copy_rate = aggregate(points)["points"][0]["metrics"]["sampled:4/copy_rate"]  # the copy gauge, per point
    assert copy_rate["mean"] == pytest.approx(0.2) and copy_rate["sd"] == pytest.approx(0.1)
    assert "| copy_rate | 0.2000 ± 0.1000" in markdown(aggregate(points), "t")
    with pytest.raises(ConfigError, match="neither a run's summary.json"):
        read_result(tmp_path)


def _gsm8k_record(item: str, n_tok: int, none: float, null: float, sampled: list[float], seed: int = 0) -> dict:
    thoughts = [
        {"text": f"s{seed}{item}{j}", "reward": t - null, "length": 3, "finished": True, "copies_first": j == 1}
        for j, t in enumerate(sampled)
    ]
    return {
        "id": item,
        "target_tokens": [" 4"] * n_tok,
        "answer_tokens": n_tok,
        "none": {"answer_logp": none, "likelihood": 0.1},
        "null": {"answer_logp": null, "likelihood": 0.1},
        "sampled": {"answer_logp": sampled, "likelihood": [0.1] * len(sampled)},
        "thoughts": thoughts,
    }


def test_eval_folders_pool_their_items_across_seeds_by_hand(tmp_path):
    """Per-token Δ NLL against no thought, per item: a: (mean sampled − none) / 2 tokens, b: the same over 1 token.
    seed 0: a (−3 + 4) / 2 = 0.5, b (−1 + 1) / 1 = 0; seed 1: a (−1 + 4) / 2 = 1.5, b (−3 + 1) / 1 = −2.
    Pooled, token-weighted: (0.5·2 + 0·1 + 1.5·2 − 2·1) / 6 = 1/3, over 2 units (items a and b)."""
    records = {
        0: [_gsm8k_record("a", 2, -4.0, -3.0, [-2.0, -4.0]), _gsm8k_record("b", 1, -1.0, -2.0, [-1.5, -0.5])],
        1: [_gsm8k_record("a", 2, -4.0, -3.0, [-1.0, -1.0], 1), _gsm8k_record("b", 1, -1.0, -2.0, [-3.0, -3.0], 1)],
    }
    folders = []
    for seed, recs in records.items():
        folder = tmp_path / f"eval{seed}"
        folder.mkdir()
        results = {"task": "gsm8k", "seed": seed, "modes": ["none", "null", "sampled:2"], "metrics": {}}
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "settings.json").write_text(json.dumps({"task": "gsm8k", "seed": seed}))
        (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        folders.append(folder)
    study = aggregate(group_by_point([read_result(f) for f in folders]))
    pooled = study["points"][0]["metrics"]
    gain = pooled["sampled:2/delta_nll_none"]["pooled"]
    assert gain["value"] == pytest.approx(1 / 3) and gain["n"] == 4 and gain["groups"] == 2
    assert gain["ci_low"] <= gain["value"] <= gain["ci_high"]
    # Δ vs the null thought: a (−3 + 3) / 2 = 0, (−1 + 3) / 2 = 1; b (−1 + 2) = 1, (−3 + 2) = −1: (0 + 1 + 2 − 1) / 6
    assert pooled["sampled:2/delta_nll"]["pooled"]["value"] == pytest.approx(2 / 6)
    # best of K per item: a −max(−2, −4) / 2 = 1, b 0.5; seed 1: a 0.5, b 3 → (2 + 0.5 + 1 + 3) / 6
    assert pooled["sampled:2/nll_best"]["pooled"]["value"] == pytest.approx(6.5 / 6)
    # Per-token gains over the null thought: s0a [0.5, -0.5], s0b [0.5, 1.5], s1a [1, 1], s1b [-1, -1]; over no
    # thought: s0b1 (−0.5 + 1) / 1 = 0.5, s0a1 (−4 + 4) / 2 = 0.
    extremes = study["points"][0]["thoughts"]
    assert [r["vs_null"] for r in extremes["helped"]] == [1.5, 1.0, 1.0]
    assert [r["vs_null"] for r in extremes["hurt"]] == [-1.0, -1.0, -0.5]
    assert (extremes["helped"][0]["thought"], extremes["helped"][0]["vs_none"]) == ("s0b1", 0.5)
    assert (extremes["hurt"][2]["thought"], extremes["hurt"][2]["vs_none"]) == ("s0a1", 0.0)
    assert "`s0b1` | ` 4` | y_1 |" in markdown(study, "t")  # the copy gauge marks thoughts holding y_1
    # copy_rate per point: one of each item's two thoughts holds y_1 (records without copies_target add none)
    assert pooled["sampled:2/copy_rate"]["mean"] == 0.5 and "sampled:2/copy_rate_target" not in pooled
    # An item is one resampling unit whatever the number of seeds that saw it: the same seed's items twice give
    # the one seed's interval, not a narrower one.
    one = read_result(folders[0]).items["sampled:2/delta_nll_none"]
    assert pooled_items([one, one]) == pooled_items([one]) | {"n": 4}


def test_a_rerun_sweep_skips_the_finished_run_and_resumes_the_interrupted_one(tmp_path, capsys):
    study = tmp_path / "study"
    fixed = [
        *TINY,
        "trainer.max_steps=2",
        "trainer.save_every=1",
        "trainer.dump_rollouts=false",
        "trainer.num_threads=1",
    ]
    sweep(None, fixed, [0], study)  # seed 0 runs to the end
    done = study / "seed-0" / "metrics.jsonl"
    before = (done.read_text(), done.stat().st_mtime_ns)
    # seed 1 stopped after its first checkpoint: no summary.json
    seed1 = plan(fixed, [1], study)[0][0]
    from thinkrl.run.trainer import Trainer

    Trainer(load_config(None, [*seed1.overrides, "trainer.max_steps=1"])).train()
    (seed1.folder / "summary.json").unlink()
    capsys.readouterr()

    result = sweep(None, fixed, [0, 1], study)
    printed = capsys.readouterr().out
    assert "[1/2] seed-0: done" in printed and "[2/2] seed-1: resume" in printed
    assert (done.read_text(), done.stat().st_mtime_ns) == before, "the finished run was trained again"
    rows = [json.loads(line) for line in (seed1.folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2], "seed 1 should resume at step 1"
    assert json.loads((seed1.folder / "summary.json").read_text())["steps"] == 2
    assert result["points"][0]["n"] == 2 and result["points"][0]["seeds"] == [0, 1]
    assert (study / "study.md").is_file() and (study / "plots" / "reward.png").is_file()

    # the same study folder with another recipe stops before anything trains, naming the key
    with pytest.raises(ConfigError, match=r"rollout.max_thought_len \(4 → 3\)"):
        sweep(None, [*fixed, "rollout.max_thought_len=3"], [0, 1], study, dry_run=True)


def test_compute_matched_baseline_follows_each_seed_and_is_its_own_point(tmp_path, capsys):
    study = tmp_path / "study"
    fixed = [*TINY, "trainer.max_steps=2", "trainer.dump_rollouts=false", "trainer.num_threads=1"]
    runs, _, _ = plan(fixed, [0, 1], study, baseline=True)
    assert [str(r.folder.relative_to(study)) for r in runs] == [
        "seed-0",
        "baseline/seed-0",
        "seed-1",
        "baseline/seed-1",
    ]
    assert runs[1].label == "baseline" and runs[1].matches == study / "seed-0"
    assert {f"trainer.compute_match={study / 'seed-0'}", "learner.objective=lm"} <= set(runs[1].overrides)

    result = sweep(None, fixed, [0], study, baseline=True)  # one seed keeps it short; plan() pairs every seed
    thought = json.loads((study / "seed-0" / "summary.json").read_text())
    lm = json.loads((study / "baseline" / "seed-0" / "summary.json").read_text())
    budget = thought["compute"]["flops_total"]
    lm_step = lm["compute"]["flops_total"] / lm["steps"]  # every step of the baseline costs the same here
    assert lm["stopped_by"] == "max_flops" and lm["compute"]["max_flops"] == budget
    assert budget <= lm["compute"]["flops_total"] < budget + lm_step  # stopped at the step that reached it
    assert lm["steps"] > thought["steps"] == 2 and lm["final_eval"]["thought_len_mean"] == 0.0
    assert [p["label"] for p in result["points"]] == ["all", "baseline"]
    thoughts, baseline = result["points"]
    assert baseline["n"] == 1 and baseline["folders"] == [str(study / "baseline" / "seed-0")]
    gain = thoughts["metrics"]["matched_lm/nll_gain"]["values"]
    assert gain == [pytest.approx(lm["final_eval"]["nll_base"] - thought["final_eval"]["nll_thought"])]
    md = (study / "study.md").read_text()
    assert "## matched_lm" in md and "## compute" in md and "| baseline | 1 | 0 |" in md

    capsys.readouterr()
    sweep(None, fixed, [0], study, baseline=True)  # a rerun trains nothing
    printed = capsys.readouterr().out
    assert printed.count(": done") == 2 and "training" not in printed


def _eval_folder(
    folder: Path, records: list[dict], modes: list[str], train_seed: int, objective: str, checkpoint: str = ""
) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"task": "gsm8k", "seed": 0, "modes": modes, "metrics": {}}))
    recipe = {"trainer": {"seed": train_seed}, "learner": {"objective": objective}}
    checkpoint = checkpoint or f"runs/x/checkpoint-{train_seed}"
    settings = {"task": "gsm8k", "seed": 0, "checkpoint": checkpoint, "recipe": recipe}
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_evaluations_of_compute_matched_baselines_pair_with_the_thought_runs_by_hand(tmp_path):
    """Thought run, seed 0: NLL per token after its thoughts a: 3/2 tokens = 1.5, b: 1.0. Its LM baseline with no
    thought: a: 2/2 = 1.0, b: 1.5. Baseline − thought: a −0.5 (2 tokens), b +0.5 (1 token) → −1/6 per token."""
    thought = _eval_folder(
        tmp_path / "thought",
        [_gsm8k_record("a", 2, -4.0, -3.0, [-2.0, -4.0]), _gsm8k_record("b", 1, -1.0, -2.0, [-1.5, -0.5])],
        ["none", "null", "sampled:2"],
        0,
        "thoughts",
    )
    base_records = [
        {"id": item, "answer_tokens": n, "none": {"answer_logp": lp, "likelihood": 0.1}, "thoughts": []}
        for item, n, lp in (("a", 2, -2.0), ("b", 1, -1.5))
    ]
    baseline = _eval_folder(tmp_path / "baseline", base_records, ["none"], 0, "lm")
    points = group_by_point([read_result(thought), read_result(baseline)])
    assert len(points) == 2  # the baseline is its own point
    study = aggregate(points)
    thought_point = next(p for p in study["points"] if "matched_lm/delta_nll" in p["metrics"])
    gain = thought_point["metrics"]["matched_lm/delta_nll"]
    assert gain["values"] == [pytest.approx(-1 / 6)] and gain["pooled"]["value"] == pytest.approx(-1 / 6)
    assert thought_point["seeds"] == [0]
    assert all("matched_lm/delta_nll" not in p["metrics"] for p in study["points"] if p is not thought_point)


def test_final_checkpoints_of_seeds_that_stop_at_different_steps_are_one_point(tmp_path):
    """A compute-matched baseline stops where its FLOP budget ends (seed 0 at step 89, seed 1 at 88): evaluations
    of both final checkpoints are one point of two seeds; an earlier checkpoint is a point of its own."""
    records = [{"id": "a", "answer_tokens": 1, "none": {"answer_logp": -1.0, "likelihood": 0.1}, "thoughts": []}]
    folders = []
    for seed, step in ((0, 89), (1, 88), (0, 80)):
        run = tmp_path / "runs" / f"seed-{seed}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "summary.json").write_text(json.dumps({"steps": {0: 89, 1: 88}[seed]}))
        checkpoint = str(run / f"checkpoint-{step}")
        folders.append(_eval_folder(tmp_path / f"eval-{seed}-{step}", records, ["none"], seed, "lm", checkpoint))
    points = group_by_point([read_result(f) for f in folders])
    assert sorted(len(results) for results in points.values()) == [1, 2]
    final = next(results for results in points.values() if len(results) == 2)
    assert sorted(r.seed for r in final) == [0, 1] and {r.identity["checkpoint"] for r in final} == {"final"}
