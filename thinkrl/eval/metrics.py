"""Per-item records → per-item metric values (pure; the bootstrap in ``stats`` turns them into intervals).

Metric keys are ``<mode>/<name>`` with mode ``none`` (no thought: the base model), ``null`` (the null thought)
or ``sampled:K``. Token-level NLLs carry a weight (the item's token count) so their mean is per token.

  accuracy          GSM8K: greedy answer correct (sampled: mean over the K thoughts)
  accuracy_maj      majority vote of the K answers; accuracy_best: the answer after the highest-reward thought
  likelihood_score  Quiet-STaR's score: probability of the gold answer renormalised over digits (GSM8K; the
                    space before the answer is the prompt's side, not scored) or the letters (CSQA);
                    likelihood_best: after the highest-reward thought
  letter_accuracy   CSQA: argmax over the letters' log-likelihood; text_accuracy: over the answer texts
                    (summed log-prob), text_norm_accuracy: per token; gen_accuracy: the letter a generation names
  nll / nll_hard    per-token NLL of the answer (tasks) or next tokens (text); hard = tokens in the top decile
                    of the no-thought NLL over the whole slice
  reward_mean       Δ log-prob of the gold continuation, thought minus null thought (summed over its tokens)
  delta_nll         per-token NLL after the null thought minus after the sampled thought (> 0: thoughts help)
  delta_nll_none    per-token NLL with no thought (the base) minus after the sampled thought: a null phrase the
                    model finds odd can make delta_nll look good while this one is negative
  nll_best          per-token NLL after the best of the K thoughts for that item (an oracle: what search could get)
  null_rate         share of items where no sampled thought beats the null thought
  thought_len, unfinished_rate   tokens per thought; share that hit the length limit without the end marker
  copy_rate         share of the mode's thoughts whose tokens contain the first gold target token y_1 (none: 0, it
                    has no thought; null: the null thought's tokens, 0 for the empty one); copy_rate_target: the
                    whole gold target as a contiguous run (``rl.copy_gauge``, record fields ``copies_first`` /
                    ``copies_target``; records written before the gauge have neither and add nothing)
  reward_copy_share sampled: share of the positive reward earned by thoughts containing y_1, Σ max(r, 0) over
                    copying thoughts / Σ max(r, 0) (per item, weighted by the item's positive reward, so the mean
                    is the ratio of the sums; the runner reports 0 when no thought has a positive reward)

Text items are thought positions; the positions of one window (record field ``doc``) share their text, so their
values carry the window as a bootstrap group (``stats``: whole windows are resampled).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def majority(preds: list) -> object:
    """Most common non-None prediction; ties go to the earliest thought."""
    votes = Counter(p for p in preds if p is not None)
    return votes.most_common(1)[0][0] if votes else None


class _Collector:
    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.weights: dict[str, list[float]] = {}
        self.groups: dict[str, list] = {}
        self.items: dict[str, list] = {}
        self.group = None  # the bootstrap group of the values added next (None: each item is its own)
        self.item = None  # the id of the item whose values are added next

    def add(self, key: str, value: float, weight: float = 1.0) -> None:
        self.values.setdefault(key, []).append(float(value))
        self.weights.setdefault(key, []).append(float(weight))
        self.groups.setdefault(key, []).append(self.group)
        self.items.setdefault(key, []).append(self.item)

    def grouped(self) -> dict[str, list]:
        """Group labels of the metrics whose every value has one."""
        return {k: g for k, g in self.groups.items() if all(x is not None for x in g)}


def _thought_stats(c: _Collector, mode: str, rec: dict) -> None:
    thoughts = rec["thoughts"]
    rewards = [t["reward"] for t in thoughts]
    c.add(f"{mode}/reward_mean", float(np.mean(rewards)))
    c.add(f"{mode}/null_rate", float(max(rewards) <= 0))
    c.add(f"{mode}/thought_len", float(np.mean([t["length"] for t in thoughts])))
    c.add(f"{mode}/unfinished_rate", float(np.mean([not t["finished"] for t in thoughts])))


def _copy_stats(c: _Collector, mode: str, rec: dict) -> None:
    """copy_rate, copy_rate_target (and, sampled, reward_copy_share) of one item's thoughts in ``mode``."""
    kind = mode.split(":")[0]
    if kind == "none":  # no thought, nothing to copy
        c.add(f"{mode}/copy_rate", 0.0)
        c.add(f"{mode}/copy_rate_target", 0.0)
        return
    flags = [rec["null_copies"]] if kind == "null" and "null_copies" in rec else []
    if kind != "null":
        flags = [t for t in rec["thoughts"] if "copies_first" in t]
    if not flags:
        return
    c.add(f"{mode}/copy_rate", float(np.mean([bool(f["copies_first"]) for f in flags])))
    if all("copies_target" in f for f in flags):
        c.add(f"{mode}/copy_rate_target", float(np.mean([bool(f["copies_target"]) for f in flags])))
    if kind != "null":
        positive = [max(float(t["reward"]), 0.0) for t in flags]
        total = sum(positive)
        copied = sum(p for p, t in zip(positive, flags) if t["copies_first"])
        c.add(f"{mode}/reward_copy_share", copied / total if total > 0 else 0.0, total)


def _copy_rows(c: _Collector, modes: list[str], rec: dict) -> None:
    """The copy gauge of every mode, after the item's other metrics (so its rows close the results table)."""
    for mode in modes:
        _copy_stats(c, mode, rec)


def _answer_nll(
    c: _Collector,
    mode: str,
    logp_total,
    n_tokens: int,
    null_total: float | None = None,
    none_total: float | None = None,
) -> None:
    """Per-token NLL of the gold answer (sampled: mean over thoughts, and the best thought's) and the gains over
    the null thought and over no thought, where those were scored."""
    mean_total = float(np.mean(logp_total))
    c.add(f"{mode}/nll", -mean_total / n_tokens, n_tokens)
    if mode.startswith("sampled"):
        c.add(f"{mode}/nll_best", -float(np.max(logp_total)) / n_tokens, n_tokens)
    if null_total is not None:
        c.add(f"{mode}/delta_nll", (mean_total - null_total) / n_tokens, n_tokens)
    if none_total is not None:
        c.add(f"{mode}/delta_nll_none", (mean_total - none_total) / n_tokens, n_tokens)


def _none_total(rec: dict, key: str) -> float | None:
    """The item's no-thought log-prob total, when ``none`` was scored."""
    return rec["none"][key] if "none" in rec else None


def gsm8k_metrics(records: list[dict], modes: list[str]) -> _Collector:
    c = _Collector()
    for rec in records:
        c.item = rec["id"]
        n_tok = rec["answer_tokens"]
        for mode in modes:
            r = rec[mode.split(":")[0]]
            if mode.startswith("sampled"):
                best = int(np.argmax([t["reward"] for t in rec["thoughts"]]))
                c.add(f"{mode}/likelihood_score", float(np.mean(r["likelihood"])))
                c.add(f"{mode}/likelihood_best", r["likelihood"][best])
                if "correct" in r:
                    c.add(f"{mode}/accuracy", float(np.mean(r["correct"])))
                    c.add(f"{mode}/accuracy_maj", float(r["maj_correct"]))
                    c.add(f"{mode}/accuracy_best", float(r["correct"][best]))
                _answer_nll(
                    c, mode, r["answer_logp"], n_tok, rec["null"]["answer_logp"], _none_total(rec, "answer_logp")
                )
                _thought_stats(c, mode, rec)
            else:
                c.add(f"{mode}/likelihood_score", r["likelihood"])
                if "correct" in r:
                    c.add(f"{mode}/accuracy", float(r["correct"]))
                _answer_nll(c, mode, r["answer_logp"], n_tok)
        _copy_rows(c, modes, rec)
    return c


def csqa_metrics(records: list[dict], modes: list[str]) -> _Collector:
    c = _Collector()
    for rec in records:
        c.item = rec["id"]
        gold = rec["labels"].index(rec["gold"])
        n_tok = rec["answer_tokens"]
        for mode in modes:
            r = rec[mode.split(":")[0]]
            letter = np.asarray(r["letter_logp"], dtype=float)  # (C,) or (K, C)
            text = np.asarray(r["text_logp"], dtype=float)
            text_norm = np.asarray(r["text_norm_logp"], dtype=float)
            probs = np.exp(letter - np.logaddexp.reduce(letter, axis=-1, keepdims=True))
            letter_ok = letter.argmax(-1) == gold
            c.add(f"{mode}/letter_accuracy", float(np.mean(letter_ok)))
            c.add(f"{mode}/text_accuracy", float(np.mean(text.argmax(-1) == gold)))
            c.add(f"{mode}/text_norm_accuracy", float(np.mean(text_norm.argmax(-1) == gold)))
            c.add(f"{mode}/likelihood_score", float(np.mean(probs[..., gold])))
            if "gen_letters" in r:
                c.add(f"{mode}/gen_accuracy", float(np.mean([p == rec["gold"] for p in r["gen_letters"]])))
            if mode.startswith("sampled"):
                best = int(np.argmax([t["reward"] for t in rec["thoughts"]]))
                vote = majority([int(i) for i in letter.argmax(-1)])
                c.add(f"{mode}/letter_accuracy_maj", float(vote == gold))
                c.add(f"{mode}/letter_accuracy_best", float(letter_ok[best]))
                _answer_nll(c, mode, r["gold_logp"], n_tok, rec["null"]["gold_logp"], _none_total(rec, "gold_logp"))
                _thought_stats(c, mode, rec)
            else:
                _answer_nll(c, mode, r["gold_logp"], n_tok)
        _copy_rows(c, modes, rec)
    return c


def text_metrics(records: list[dict], modes: list[str]) -> _Collector:
    c = _Collector()
    base = np.concatenate([np.asarray(rec["logp"]["none"]) for rec in records]) if records else np.zeros(0)
    # Hard tokens: the top decile of the no-thought NLL over the whole slice (one threshold for every mode).
    threshold = float(np.quantile(-base, 0.9)) if base.size else 0.0
    for rec in records:
        c.group, c.item = rec.get("doc"), rec["id"]
        none = np.asarray(rec["logp"]["none"])
        hard = -none >= threshold
        null_total = float(np.sum(rec["logp"]["null"])) if "null" in rec["logp"] else None
        none_total = float(np.sum(none))
        for mode in modes:
            lp = np.asarray(rec["logp"][mode.split(":")[0]])  # (n,) or (K, n)
            rows = lp.reshape(-1, lp.shape[-1])
            sampled = mode.startswith("sampled")
            _answer_nll(
                c, mode, rows.sum(-1), lp.shape[-1], null_total if sampled else None, none_total if sampled else None
            )
            if hard.any():
                c.add(f"{mode}/nll_hard", float(-rows[:, hard].mean()), float(hard.sum()))
            if sampled:
                _thought_stats(c, mode, rec)
        _copy_rows(c, modes, rec)
    return c


TASK_METRICS = {"gsm8k": gsm8k_metrics, "csqa": csqa_metrics, "text": text_metrics}


def per_item_metrics(task: str, records: list[dict], modes: list[str]) -> tuple[dict, dict, dict]:
    """(values, weights, groups): per metric key, one entry per item that has it; groups only for the metrics
    whose items carry a bootstrap group (text: the window)."""
    c = TASK_METRICS[task](records, modes)
    return c.values, c.weights, c.grouped()


def per_item_clusters(task: str, records: list[dict], modes: list[str]) -> tuple[dict, dict, dict, dict]:
    """Like ``per_item_metrics``, but every value carries its resampling unit (the item's window for text, else the
    item id) and its item id. Evaluations of several models on the same items (seeds of one recipe) pool into one
    bootstrap where a unit brings all its values along, since they are not independent of each other."""
    c = TASK_METRICS[task](records, modes)
    units = {k: [f"{task}:{g if g is not None else i}" for g, i in zip(c.groups[k], c.items[k])] for k in c.values}
    return c.values, c.weights, units, c.items


def token_deltas(task: str, records: list[dict], mode: str) -> list[float]:
    """Per-token Δ log-prob, thought minus null thought (text; tasks: over the gold answer's tokens)."""
    out: list[float] = []
    for rec in records:
        if task == "text" and "null" in rec["logp"]:
            rows = np.asarray(rec["logp"][mode.split(":")[0]]).reshape(-1, len(rec["logp"]["null"]))
            out += (rows - np.asarray(rec["logp"]["null"])).ravel().tolist()
        elif "token_delta" in rec:
            out += [d for row in rec["token_delta"] for d in row]
    return out
