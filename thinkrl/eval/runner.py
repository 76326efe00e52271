"""``thinkrl eval``: score a model on a held-out slice with no thought, the null thought and K sampled thoughts.

The output folder holds ``items.jsonl`` (one record per item, appended batch by batch), ``settings.json``
(what was asked; a rerun with the same settings resumes after the items already written), ``results.json``
(every metric with a 95% bootstrap interval and N), ``results.md``, ``plots/`` and ``report.html``.
Every item's thoughts come from its own seed (``item_seed``), so they do not depend on the batch or a resume.

``--task text``: an item is one thought position of a held-out window (record fields ``doc`` and ``slot``: the
window and the context length), the slice is drawn window by window, and bootstrap intervals resample whole windows.
When the recipe uses parallel passes (``Config.parallel_passes``), each batch is whole windows (at least one, up to
``batch_size`` positions): the window is read once and the thoughts of all its positions are sampled and scored
together; the records are the per-position path's, item for item (same seeds, same numbers up to float error).
The HTML report then also shows the first windows as passages with a marker at each thought position.

Copy gauge (``rl.copy_gauge``): every sampled thought's record carries ``copies_first`` (its tokens contain the first
gold target token y_1) and ``copies_target`` (the whole gold target as a contiguous run); ``null_copies`` holds the
null thought's. Task targets (GSM8K, CSQA) start at their first token that is not whitespace only: the space before
an answer is the prompt's delimiter, not the answer. ``report.html`` marks copying thoughts.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from thinkrl import output_folder
from thinkrl.config import to_dict
from thinkrl.data.windows import WindowBatch, group_windows, window_batch
from thinkrl.errors import ConfigError, DataError
from thinkrl.eval import base_scores, report, stats
from thinkrl.eval import metrics as metric_fns
from thinkrl.eval.answers import extract_choice, extract_number, numbers_equal
from thinkrl.eval.generate import Generator
from thinkrl.eval.likelihood import answer_token_ids, digit_likelihood_logp
from thinkrl.eval.setup import EvalSetup
from thinkrl.eval.tasks import TASKS, EvalItem, item_seed, item_windows, load_items
from thinkrl.models.shared_prefix import right_pad
from thinkrl.prompts import null_thought_ids, reasoner_prompt, wrap_contexts
from thinkrl.rl.copy_gauge import list_copy_flags
from thinkrl.rl.scoring import Scorer
from thinkrl.rl.window_scoring import WindowScoring
from thinkrl.rollout import make_actor
from thinkrl.rollout.base import ThoughtBatch, empty_thoughts
from thinkrl.run.files import append_jsonl

logger = logging.getLogger(__name__)
# The task prompts ask for the answer on the same line; a chain-of-thought prompt would pass --stop '\n\n'.
STOP_STRINGS = {"gsm8k": ["\n"], "csqa": ["\n"]}
DEFAULT_NEW_TOKENS = {"gsm8k": 32, "csqa": 8}
RESULT_KEYS = ("task", "model", "n_items", "seed", "modes", "metrics")
PASSAGES = 5  # windows shown as passages in report.html (--task text)


def parse_modes(spec: str) -> list[str]:
    """'none,null,sampled:4' → ['none', 'null', 'sampled:4'] (at most one sampled mode)."""
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    for m in modes:
        if m not in ("none", "null") and not (m.startswith("sampled:") and m[8:].isdigit() and int(m[8:]) > 0):
            raise ConfigError(f"--thoughts entry {m!r} is not none, null or sampled:K (K >= 1)")
    if not modes or sum(m.startswith("sampled") for m in modes) > 1:
        raise ConfigError("--thoughts needs at least one mode and at most one sampled:K")
    return modes


@dataclass
class EvalOptions:
    task: str
    model: str
    thoughts: str = "none,null,sampled:4"
    limit: int = 0
    seed: int = 0
    batch_size: int = 8  # items per batch (not part of the settings a resume must match)
    max_new_tokens: int = 0  # 0 = the task's default
    generate: bool = True
    overwrite: bool = False  # write into a folder holding other files, replacing only an evaluation's own
    stop: str = ""  # comma list of stop strings for generation ('' = the task's); backslash escapes allowed
    output_dir: str = ""
    modes: list[str] = field(init=False)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task} is unknown; use one of {', '.join(TASKS)}")
        self.modes = parse_modes(self.thoughts)
        if "null" not in self.modes and any(m.startswith("sampled") for m in self.modes):
            self.modes.insert(0, "null")  # rewards are measured against the null thought
        if self.limit < 0 or self.batch_size < 1 or self.max_new_tokens < 0:
            raise ConfigError("--limit and --max-new-tokens must be >= 0 and --batch-size >= 1")
        self.max_new_tokens = self.max_new_tokens or DEFAULT_NEW_TOKENS.get(self.task, 0)

    @property
    def k(self) -> int:
        return next((int(m[8:]) for m in self.modes if m.startswith("sampled")), 0)

    @property
    def null_row(self) -> bool:
        """Whether the null thought is scored: asked for, or needed as the sampled thoughts' reference. Without
        it (``--thoughts none``) only the base model runs and records and metrics hold no ``null`` entry."""
        return "null" in self.modes


def _is_evaluation(folder: Path) -> bool:
    """An evaluation folder written before folders carried thinkrl's stamp: its settings.json records a recipe."""
    try:
        return "recipe" in json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def folder_decision(opts: EvalOptions) -> output_folder.Decision:
    """thinkrl's folder rule for ``opts.output_dir`` (reads only; ``Evaluator`` claims it)."""
    return output_folder.decide(opts.output_dir, "eval", _is_evaluation, opts.overwrite)


class Evaluator:
    def __init__(self, opts: EvalOptions, setup: EvalSetup):
        self.opts, self.cfg, self.roles = opts, setup.cfg, setup.roles
        self.out = Path(opts.output_dir)
        # thinkrl's folder rule, before anything (the vLLM engine's weights included) is written there
        self.folder = folder_decision(opts)
        tok = self.roles.tokenizer
        self.items = load_items(opts.task, self.cfg, tok, opts.limit, opts.seed)
        if not self.items:
            raise DataError(f"no {opts.task} items to evaluate; check the data file and --limit")
        ro = self.cfg.rollout
        self.null_ids = null_thought_ids(ro.null_thought, tok)
        self.prompt = reasoner_prompt(ro.reasoner_template, tok)
        self.scorer = Scorer(self.roles, self.null_ids, self.cfg.data.interpreter_window, self.cfg.reward.source)
        # Text positions of whole windows in parallel passes (the trainer's held-out evaluation does the same).
        self.parallel = opts.task == "text" and self.cfg.parallel_passes()
        if self.parallel:
            item_windows(self.items)  # fails early when the positions cannot be read as whole windows
        wrapper = len(self.prompt.prefix) + len(self.prompt.suffix) if self.prompt else 0
        longest = max(len(it.context) for it in self.items) + wrapper + ro.max_thought_len + len(self.null_ids)
        output_folder.claim(self.folder)
        self.actor = make_actor(ro, self.roles, self.out, longest + opts.max_new_tokens + 8)
        self.generate = Generator(self.roles, self.actor, opts.batch_size)
        gsm8k = opts.task == "gsm8k"
        self.digits = answer_token_ids(tok, "digits") if gsm8k else None
        self.delimiter = answer_token_ids(tok, "space") if gsm8k else None  # not scored: the prompt's side
        self.settings = {
            **{k: v for k, v in asdict(opts).items() if k not in ("batch_size", "output_dir", "overwrite")},
            "recipe": to_dict(self.cfg),
            "checkpoint": str(setup.checkpoint) if setup.checkpoint else None,
        }

    # --------------------------------------------------------------------------------------------------------
    def _resume(self) -> dict[int, dict]:
        """Records already written by an evaluation with the same settings (a different one is refused)."""
        self.out.mkdir(parents=True, exist_ok=True)
        settings_path, items_path = self.out / "settings.json", self.out / "items.jsonl"
        if settings_path.is_file():
            old = json.loads(settings_path.read_text())
            if old != json.loads(json.dumps(self.settings)):
                changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
                raise ConfigError(
                    f"{self.out} holds an evaluation with other settings ({', '.join(changed)}); "
                    "use another --output folder or delete that one"
                )
        else:
            report.write_json(settings_path, self.settings)
        done = {}
        if items_path.is_file():
            for line in items_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the interruption: that item is redone
                    continue
                done[rec["id"]] = rec
            # Rewrite without a cut last line, so appended records start on a fresh line.
            items_path.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")
        return done

    def run(self) -> dict:
        start = time.perf_counter()
        done = self._resume()
        todo = [it for it in self.items if it.id not in done]
        if done:
            logger.info("resuming: %d of %d items already evaluated in %s", len(done), len(self.items), self.out)
        for model in self.roles.models.values():
            model.eval()
        bar = tqdm(total=len(self.items), initial=len(self.items) - len(todo), desc=f"eval {self.opts.task}")
        with torch.no_grad():
            for batch in self._batches(todo):
                for rec in self._evaluate_batch(batch):
                    append_jsonl(self.out / "items.jsonl", rec)
                    done[rec["id"]] = rec
                bar.update(len(batch))
        bar.close()
        self.actor.close()
        records = self.records = [done[it.id] for it in self.items]
        results = self._summarise(records)
        self._write_reports(results, records)
        logger.info("evaluated %d items in %.1f s", len(records), time.perf_counter() - start)
        return results

    # --------------------------------------------------------------------------------------------------------
    def _batches(self, todo: list[EvalItem]) -> list[list[EvalItem]]:
        """``batch_size`` items at a time; parallel passes: whole windows, as many as fit in ``batch_size``
        positions (at least one), so each window is read once."""
        size = self.opts.batch_size
        if not self.parallel:
            return [todo[s : s + size] for s in range(0, len(todo), size)]
        batches, start = [], 0
        for group in group_windows(item_windows(todo), size):  # a window's slots are consecutive items
            count = sum(len(w.slots) for w in group)
            batches.append(todo[start : start + count])
            start += count
        return batches

    def _window_batch(self, batch: list[EvalItem]) -> WindowBatch | None:
        if not self.parallel:
            return None
        return window_batch(item_windows(batch), self.scorer.pad_id, self.roles.model("interpreter").device)

    def _thoughts(self, batch: list[EvalItem], windows: WindowBatch | None) -> tuple[ThoughtBatch, list[list[dict]]]:
        k, tok = self.opts.k, self.roles.tokenizer
        contexts = [it.context for it in batch]
        if not k:
            return empty_thoughts(len(batch), self.roles.model("interpreter").device), [[] for _ in batch]
        seeds = [item_seed(self.opts.seed, it.id) for it in batch]
        if windows is not None:  # the windows' slots are the batch's items, in order
            thoughts = self.actor.sample_windows(windows, k, seeds)
        else:
            thoughts = self.actor.sample(wrap_contexts(self.prompt, contexts), k, seeds)
        described = [
            [
                {
                    "text": tok.decode(thoughts.thought_ids[i, j, : int(thoughts.lengths[i, j])].tolist()),
                    "ids": thoughts.thought_ids[i, j, : int(thoughts.lengths[i, j])].tolist(),
                    "length": int(thoughts.lengths[i, j]),
                    "finished": bool(thoughts.finished[i, j]),
                    # log pi_sampler of the thought's actions, its end token included when it stopped itself
                    "sampler_logp": round(float(thoughts.sampler_logps[i, j].sum()), 6),
                }
                for j in range(k)
            ]
            for i in range(len(batch))
        ]
        return thoughts, described

    def _prompts(self, batch: list[EvalItem], thoughts: ThoughtBatch) -> dict[str, list[list[int]]]:
        """Generation prompts per mode: the interpreter's (windowed) context, then the thought's markers."""
        windows = [self.scorer.window_of(it.context) for it in batch]
        sot, eot = self.roles.sot_id, self.roles.eot_id
        prompts = {"none": windows, "null": [w + [sot, *self.null_ids, eot] for w in windows]}
        if thoughts.num_thoughts:
            seqs = thoughts.interpreter_sequences(sot, eot)
            prompts["sampled"] = [w + z for w, row in zip(windows, seqs) for z in row]
        return prompts

    def _generations(self, batch, thoughts) -> dict[str, list[str]]:
        if not self.opts.generate or self.opts.task not in STOP_STRINGS:
            return {}
        n_new = self.opts.max_new_tokens
        stops = [codecs.decode(x, "unicode_escape") for x in self.opts.stop.split(",") if x] or STOP_STRINGS[
            self.opts.task
        ]
        prompts = self._prompts(batch, thoughts)
        wanted = {m.split(":")[0] for m in self.opts.modes}
        role = {"none": "base", "null": "interpreter", "sampled": "interpreter"}
        return {m: self.generate(role[m], p, n_new, stops) for m, p in prompts.items() if m in wanted}

    def _score(self, batch: list[EvalItem], thoughts: ThoughtBatch, windows: WindowBatch | None = None) -> tuple:
        """Per item and candidate answer: (logp, logp_reward (N, K+1, C, n), logp_base, mask (N, C, n), likelihood
        scores or None). GSM8K keeps full distributions for the digit-renormalised score; text in parallel passes
        scores the windows (``WindowScoring``). Without the null row: the base alone, K+1 = 0 (``_score_base``)."""
        if not self.opts.null_row:
            return self._score_base(batch, windows)
        contexts = [it.context for it in batch]
        if self.opts.task == "csqa":
            logp, logp_reward, logp_base, _, mask = self.scorer.candidates(
                contexts, [it.targets for it in batch], thoughts
            )
            return logp, logp_reward, logp_base, mask, None
        targets = [it.targets[0] for it in batch]
        like = None
        if windows is not None:
            sc = WindowScoring(self.cfg, self.roles, self.scorer, windows).scores(thoughts)
        elif self.opts.task == "text":
            sc = self.scorer.score(contexts, targets, thoughts)
        else:
            dists = self.scorer.distributions(contexts, targets, thoughts)
            sc = dists.scores()
            ids, mask = dists.target_ids, dists.target_mask
            like = {
                "rows": self._likelihood(dists.logp, ids[:, None].expand_as(sc.logp), mask[:, None]),
                "base": self._likelihood(dists.logp_base, ids, mask),
            }
        add_c = lambda t: t.unsqueeze(-2)  # noqa: E731  (…, n) → (…, 1, n)
        return add_c(sc.logp), add_c(sc.logp_reward), add_c(sc.logp_base), add_c(sc.target_mask), like

    def _likelihood(self, logp: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GSM8K's likelihood score (digits renormalised, the leading space not scored), (N, ...) → (N, 1, ...):
        one candidate axis, like CSQA's."""
        return digit_likelihood_logp(logp, ids, mask, self.digits, self.delimiter).exp()[:, None]

    def _score_base(self, batch: list[EvalItem], windows: WindowBatch | None) -> tuple:
        """``_score`` for the base model alone (``--thoughts none``): the same tensors with an empty thought axis,
        (N, 0, C, n), so no thought row, not even the null thought's, is computed. Parallel passes: one read per
        window (unless ``interpreter_window`` cuts each position's context, as in ``WindowScoring``)."""
        model, pad = self.roles.model("base"), self.scorer.pad_id
        lm_head = self.roles.true_token_head("base")
        contexts = [self.scorer.window_of(it.context) for it in batch]
        candidates = [it.targets for it in batch]
        n_pos, c = len(batch), len(candidates[0])
        ids, lengths = right_pad([y for cands in candidates for y in cands], pad, model.device)
        mask = torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]
        ids, mask = ids.reshape(n_pos, c, -1), mask.reshape(n_pos, c, -1)  # (N, C, n)
        like = None
        if self.opts.task == "csqa":
            hidden = base_scores.candidate_states(model, contexts, candidates, pad)  # (N, C, n, d)
            logp_base = base_scores.target_logps(lm_head, hidden, ids)
        elif windows is not None and not self.scorer.window:
            hidden = base_scores.window_states(model, windows, ids.shape[-1])  # (N, n, d)
            logp_base = base_scores.target_logps(lm_head, hidden, ids[:, 0])[:, None]
        else:
            hidden = base_scores.target_states(model, contexts, [cands[0] for cands in candidates], pad)  # (N, n, d)
            if self.opts.task == "gsm8k":  # full distributions for the digit-renormalised score
                dists = base_scores.log_distributions(lm_head, hidden)  # (N, n, V)
                logp_base = dists.gather(-1, ids[:, 0, :, None]).squeeze(-1)[:, None]
                like = {"rows": dists.new_zeros(n_pos, 1, 0), "base": self._likelihood(dists, ids[:, 0], mask[:, 0])}
            else:
                logp_base = base_scores.target_logps(lm_head, hidden, ids[:, 0])[:, None]
        no_rows = logp_base.new_zeros(n_pos, 0, c, ids.shape[-1])
        return no_rows, no_rows, logp_base, mask, like

    def _evaluate_batch(self, batch: list[EvalItem]) -> list[dict]:
        windows = self._window_batch(batch)
        thoughts, described = self._thoughts(batch, windows)
        gens = self._generations(batch, thoughts)
        logp, logp_reward, logp_base, mask, like = self._score(batch, thoughts, windows)
        m = mask.float()
        # Per item, candidate-major as the record builders read them: (C, K+1) totals, (C, K+1, n) tokens.
        totals = (logp * m[:, None]).sum(-1).transpose(1, 2).cpu()
        reward_totals = (logp_reward * m[:, None]).sum(-1).transpose(1, 2).cpu()
        base_totals = (logp_base * m).sum(-1).cpu()
        build = {"gsm8k": self._gsm8k_record, "csqa": self._csqa_record, "text": self._text_record}[self.opts.task]
        records = []
        for i, it in enumerate(batch):
            ctx = {
                "totals": totals[i],
                "reward_totals": reward_totals[i],
                "base": base_totals[i],
                "logp": logp[i].transpose(0, 1).cpu(),
                "logp_base": logp_base[i].cpu(),
                "mask": mask[i].cpu(),
                "like": {k: v[i].cpu() for k, v in like.items()} if like else None,
                "gens": {m_: self._per_item(g, i, thoughts.num_thoughts, m_) for m_, g in gens.items()},
            }
            records.append(build(it, described[i], ctx))
        return records

    @staticmethod
    def _per_item(gens: list[str], i: int, k: int, mode: str):
        return gens[i * k : (i + 1) * k] if mode == "sampled" else gens[i]

    # --------------------------------------------------------------------------------------------------------
    def _common(self, it: EvalItem, thoughts: list[dict], gold_row: int, ctx: dict) -> dict:
        """Thought rewards and per-token Δ on the gold continuation (row ``gold_row`` of the item's candidates)."""
        k = len(thoughts)
        rec = {"id": it.id, "gold": it.gold, **it.info}
        n = int(ctx["mask"][gold_row].sum())
        rec["answer_tokens"] = n
        rec["target_tokens"] = [self.roles.tokenizer.decode([t]) for t in it.targets[gold_row]]
        rt = ctx["reward_totals"][gold_row]
        copied = self._copy_target(it.targets[gold_row])
        flags = list_copy_flags([t["ids"] for t in thoughts], copied)
        rec["thoughts"] = [
            {**t, "reward": round(float(rt[j] - rt[k]), 6), "copies_first": f, "copies_target": w}
            for j, (t, (f, w)) in enumerate(zip(thoughts, flags))
        ]
        if self.opts.null_row:
            ((f, w),) = list_copy_flags([self.null_ids], copied)
            rec["null_copies"] = {"copies_first": f, "copies_target": w}
        lp = ctx["logp"][gold_row][:, :n]
        rec["token_delta"] = [[round(float(d), 6) for d in lp[j] - lp[k]] for j in range(k)]
        return rec

    def _copy_target(self, target: list[int]) -> list[int]:
        """The target the copy gauge compares thoughts with: text as it is; a task answer from its first token that
        is not whitespace only (the delimiter space; at least the last token is kept)."""
        if self.opts.task == "text":
            return target
        tok, start = self.roles.tokenizer, 0
        while start < len(target) - 1 and not tok.decode([target[start]]).strip():
            start += 1
        return target[start:]

    def _gsm8k_record(self, it: EvalItem, thoughts: list[dict], ctx: dict) -> dict:
        k = len(thoughts)
        rec = self._common(it, thoughts, 0, ctx)
        tot, rows, gens = ctx["totals"][0], ctx["like"]["rows"][0], ctx["gens"]
        rec["none"] = {"answer_logp": float(ctx["base"][0]), "likelihood": float(ctx["like"]["base"][0])}
        if self.opts.null_row:
            rec["null"] = {"answer_logp": float(tot[k]), "likelihood": float(rows[k])}
        if k:
            rec["sampled"] = {"answer_logp": tot[:k].tolist(), "likelihood": rows[:k].tolist()}
        for mode, text in gens.items():
            texts = text if isinstance(text, list) else [text]
            preds = [extract_number(t) for t in texts]
            correct = [numbers_equal(p, it.gold) for p in preds]
            if mode == "sampled":
                vote = metric_fns.majority(preds)
                rec[mode].update(
                    generation=texts,
                    pred=preds,
                    correct=correct,
                    maj_pred=vote,
                    maj_correct=numbers_equal(vote, it.gold),
                )
            else:
                rec[mode].update(generation=texts[0], pred=preds[0], correct=correct[0])
        return rec

    def _csqa_record(self, it: EvalItem, thoughts: list[dict], ctx: dict) -> dict:
        k, labels = len(thoughts), it.info["labels"]
        n_choices = len(labels)
        gold_row = labels.index(it.gold) + (n_choices if it.info["gold_is_text"] else 0)
        rec = self._common(it, thoughts, gold_row, ctx)
        tot, base, mask = ctx["totals"], ctx["base"], ctx["mask"]
        lengths = mask.sum(-1).clamp_min(1).float()
        letters, texts = slice(0, n_choices), slice(n_choices, 2 * n_choices)
        # Answer texts are compared by summed log-prob (text_logp) and by mean log-prob per token (text_norm_logp).
        per_tok = tot / lengths[:, None]
        rec["none"] = {
            "letter_logp": base[letters].tolist(),
            "text_logp": base[texts].tolist(),
            "text_norm_logp": (base / lengths)[texts].tolist(),
            "gold_logp": float(base[gold_row]),
        }
        if self.opts.null_row:
            rec["null"] = {
                "letter_logp": tot[letters, k].tolist(),
                "text_logp": tot[texts, k].tolist(),
                "text_norm_logp": per_tok[texts, k].tolist(),
                "gold_logp": float(tot[gold_row, k]),
            }
        if k:
            rec["sampled"] = {
                "letter_logp": tot[letters, :k].T.tolist(),
                "text_logp": tot[texts, :k].T.tolist(),
                "text_norm_logp": per_tok[texts, :k].T.tolist(),
                "gold_logp": tot[gold_row, :k].tolist(),
            }
        for mode, text in ctx["gens"].items():
            texts_ = text if isinstance(text, list) else [text]
            rec[mode].update(generation=texts_, gen_letters=[extract_choice(t, "".join(labels)) for t in texts_])
        return rec

    def _text_record(self, it: EvalItem, thoughts: list[dict], ctx: dict) -> dict:
        k = len(thoughts)
        rec = self._common(it, thoughts, 0, ctx)
        n = rec["answer_tokens"]
        lp = ctx["logp"][0][:, :n]
        rec["context"] = self.roles.tokenizer.decode(it.context[-120:])
        rec["logp"] = {"none": ctx["logp_base"][0][:n].tolist()}
        if self.opts.null_row:
            rec["logp"]["null"] = lp[k].tolist()
        if k:
            rec["logp"]["sampled"] = lp[:k].tolist()
        return rec

    # --------------------------------------------------------------------------------------------------------
    def _summarise(self, records: list[dict]) -> dict:
        values, weights, groups = metric_fns.per_item_metrics(self.opts.task, records, self.opts.modes)
        metrics = stats.summarise(values, weights, groups, seed=self.opts.seed)
        for key, metric in metrics.items():
            if key.endswith("/reward_copy_share") and metric["n"] and math.isnan(metric["value"]):
                metric.update(value=0.0, ci_low=0.0, ci_high=0.0)  # no positive reward at all: none earned by copying
        return {
            "task": self.opts.task,
            "model": self.opts.model,
            "n_items": len(records),
            "seed": self.opts.seed,
            "modes": self.opts.modes,
            "metrics": metrics,
        }

    def _write_reports(self, results: dict, records: list[dict]) -> None:
        report.write_json(self.out / "results.json", results)
        (self.out / "results.md").write_text(report.markdown_table(results) + "\n", encoding="utf-8")
        sampled = next((m for m in self.opts.modes if m.startswith("sampled")), None)
        if sampled:
            deltas = metric_fns.token_deltas(self.opts.task, records, sampled)
            report.plot_token_deltas(
                deltas,
                self.out / "plots" / "token_deltas.png",
                f"{self.opts.task}: per-token Δ log-prob, thought − null thought",
            )
        report.plot_accuracy(results, self.out / "plots" / "accuracy.png")
        report.html_report(
            self._html_items(records),
            self.out / "report.html",
            f"thinkrl eval — {self.opts.task} — {self.opts.model}",
            self._passages(records) if self.opts.task == "text" else None,
        )

    def _html_items(self, records: list[dict], limit: int = 50) -> list[dict]:
        items = []
        for rec in records[:limit]:
            best = max(range(len(rec["thoughts"])), key=lambda j: rec["thoughts"][j]["reward"], default=None)
            deltas = rec["token_delta"][best] if best is not None else [None] * len(rec["target_tokens"])
            context = rec.get("context") or rec.get("question", "")
            note = f"gold {rec['gold']!r}"
            if best is not None:
                note += f"; best thought reward {rec['thoughts'][best]['reward']:+.3f}"
                note += _copy_note(rec["thoughts"])
            items.append(
                {
                    "title": f"item {rec['id']}",
                    "context": context,
                    "thought": rec["thoughts"][best]["text"] if best is not None else None,
                    "copies": _copies(rec["thoughts"][best]) if best is not None else None,
                    "tokens": [[t, d] for t, d in zip(rec["target_tokens"], deltas)],
                    "note": note,
                }
            )
        return items

    def _passages(self, records: list[dict], limit: int = PASSAGES) -> list[dict]:
        """The first ``limit`` windows as running text: a marker at each evaluated thought position (the best
        thought by reward), each true token with the Δ log-prob of the nearest thought before it that predicts it."""
        windows: dict[int, list[dict]] = {}
        for rec in records:
            if "doc" not in rec:
                continue
            if rec["doc"] not in windows and len(windows) == limit:
                break
            windows.setdefault(rec["doc"], []).append(rec)
        tok, items = self.roles.tokenizer, {it.id: it for it in self.items}
        passages = []
        for doc, recs in windows.items():
            tokens = items[recs[0]["id"]].window.tolist()
            deltas: list[float | None] = [None] * len(tokens)
            marks, rewards = [], []
            for rec in sorted(recs, key=lambda r: r["slot"]):
                thoughts, slot = rec["thoughts"], rec["slot"]
                best = max(range(len(thoughts)), key=lambda j: thoughts[j]["reward"], default=None)
                if best is None:
                    marks.append({"at": slot, "thought": None, "reward": None})
                    continue
                for j, d in enumerate(rec["token_delta"][best]):  # later slots overwrite: the nearest thought
                    deltas[slot + j] = d
                reward = thoughts[best]["reward"]
                marks.append(
                    {
                        "at": slot,
                        "thought": thoughts[best]["text"],
                        "reward": reward,
                        "copies": _copies(thoughts[best]),
                    }
                )
                rewards.append(reward)
            note = f"{len(recs)} thought positions"
            if rewards:
                note += f"; best-thought reward mean {sum(rewards) / len(rewards):+.3f}"
            passages.append(
                {
                    "title": f"window {doc} ({len(tokens)} tokens)",
                    "tokens": [[tok.decode([t]), d] for t, d in zip(tokens, deltas)],
                    "marks": marks,
                    "note": note,
                }
            )
        return passages


def _copies(thought: dict) -> str | None:
    """``target`` (the thought holds the whole target), ``first`` (it holds y_1), or None (neither, or a record
    written before the copy gauge)."""
    if thought.get("copies_target"):
        return "target"
    return "first" if thought.get("copies_first") else None


def _copy_note(thoughts: list[dict]) -> str:
    """'; 2/4 thoughts contain y_1 (1 the whole target)' for an item's sampled thoughts, '' when none does."""
    first = sum(bool(t.get("copies_first")) for t in thoughts)
    whole = sum(bool(t.get("copies_target")) for t in thoughts)
    return f"; {first}/{len(thoughts)} thoughts contain y_1 ({whole} the whole target)" if first else ""


def result_view(results: dict) -> dict:
    """The reproducible part of results.json (what a resumed evaluation must reproduce)."""
    return {k: results[k] for k in RESULT_KEYS}
