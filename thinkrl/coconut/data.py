"""Coconut data: problems {question, steps, answer} → token sequences for a stage → aligned batches.

Sources: the synthetic chain task (``thinkrl.coconut.synthetic``), iCoT GSM8K as ``question||steps #### answer``
lines or Coconut's JSON array, ProsQA's JSON array (``../shared/data``, see its README §3 and §5), and for users
with internet a hub dataset (rows with question/steps/answer, or GSM8K's worked solutions, whose ``<<...>>``
annotations are the iCoT steps).

Training text follows the published format: ``question\\n`` + each step + ``\\n`` + ``### answer`` + eos, each
piece tokenized on its own (as Coconut does, so a stage can drop whole steps); the question gets the tokenizer's
leading bos if the tokenizer uses one, or with ``data.chat_template`` is wrapped as a user turn so that steps
and answer are the assistant's reply. Labels cover the remaining steps and the answer; question, markers and
latents are masked.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrl.coconut.config import CoconutDataConfig
from thinkrl.coconut.curriculum import StagePlan
from thinkrl.data.sources import read_text, resolve_data_file
from thinkrl.errors import DataError
from thinkrl.prompts import bos_prefix

IGNORE = -100
# source → default (train, valid, test) files under data_dir, hub (id, config, train split, eval split)
SOURCE_FILES = {
    "gsm8k": (
        ("icot_gsm8k/train_noaug_derived.txt", "icot_gsm8k/valid.txt", "icot_gsm8k/test.txt"),
        ("openai/gsm8k", "main", "train", "test"),
    ),
    "prosqa": (("prosqa/prosqa_train.json", "prosqa/prosqa_valid.json", "prosqa/prosqa_test.json"), None),
    "file": (("", "", ""), None),
}


# ----------------------------------------------------------------------------------------------------------------
# Reading problems
# ----------------------------------------------------------------------------------------------------------------
def parse_icot_line(line: str) -> dict:
    """``question||<<a=b>> <<c=d>> #### answer`` split as Coconut's converter does (a line without steps gives
    steps [""])."""
    if "||" not in line or "##" not in line:
        raise ValueError("expected 'question||steps #### answer'")
    question, rest = line.split("||", 1)
    return {
        "question": question,
        "steps": rest.split("##")[0].strip().split(" "),
        "answer": line.split("##")[-1].strip(),
    }


def _check(row, where: str) -> dict:
    if not isinstance(row, dict) or not {"question", "steps", "answer"} <= set(row):
        raise DataError(f"{where} needs keys question, steps, answer; fix or drop it")
    if not isinstance(row["steps"], list) or not all(isinstance(s, str) for s in row["steps"]):
        raise DataError(f"{where}: steps must be a list of strings")
    return {"question": str(row["question"]), "steps": list(row["steps"]), "answer": str(row["answer"])}


def read_problems(path: Path, limit: int = 0) -> list[dict]:
    """iCoT ``.txt`` (one problem a line) or a Coconut/ProsQA ``.json`` array; malformed rows are one-line errors."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; set data.data_dir or the data.*_file paths")
    text = read_text(path)
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); give a JSON array") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold one JSON array of problems")
        problems = [_check(r, f"{path} item {i}") for i, r in enumerate(rows[: limit or None])]
    else:
        problems = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                problems.append(parse_icot_line(line))
            except ValueError as exc:
                raise DataError(f"{path}:{lineno} is malformed ({exc}); fix or delete that line") from None
            if limit and len(problems) >= limit:
                break
    if not problems:
        raise DataError(f"{path} holds no problems; point the data.*_file setting at a non-empty file")
    return problems


def from_hub_row(row: dict) -> dict:
    """A hub row → problem: question/steps/answer as is, or GSM8K's solution → iCoT steps and answer."""
    if "steps" in row:
        return _check(row, "hub row")
    solution = row["answer"]
    if "####" not in solution:
        raise ValueError("no '#### answer' line")
    return {
        "question": row["question"],
        "steps": re.findall(r"<<[^>]*>>", solution) or [""],
        "answer": solution.split("####")[-1].strip(),
    }


def _hub_problems(cfg: CoconutDataConfig, split: str, path: Path) -> list[dict]:
    spec = SOURCE_FILES.get(cfg.source, (None, None))[1]
    hub_id, hub_cfg, train_split, eval_split = (cfg.hub_id, None, "train", "test") if cfg.hub_id else spec
    import datasets  # only users with internet get here

    try:
        ds = datasets.load_dataset(hub_id, hub_cfg, split=train_split if split == "train" else eval_split)
    except Exception as exc:  # noqa: BLE001  (offline, wrong id, ...: one line for the user)
        raise DataError(
            f"{path} does not exist and hub dataset {hub_id} could not be loaded ({type(exc).__name__}); "
            "set data.data_dir or the data.*_file paths"
        ) from None
    limit = cfg.max_train if split == "train" else cfg.max_eval
    try:
        return [from_hub_row(dict(r)) for r in (ds.select(range(min(limit, len(ds)))) if limit else ds)]
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"hub dataset {hub_id} has rows Coconut cannot read ({exc}); give local files") from None


def load_split(cfg: CoconutDataConfig, split: str) -> list[dict]:
    """Problems of ``split`` (train | valid | test) for ``cfg.source``."""
    limit = cfg.max_train if split == "train" else cfg.max_eval
    if cfg.source == "synthetic":
        from thinkrl.coconut.synthetic import chain_splits

        return chain_splits(cfg.synthetic)[split][: limit or None]
    index = ("train", "valid", "test").index(split)
    given = (cfg.train_file, cfg.eval_file, cfg.test_file)[index]
    name = given or SOURCE_FILES[cfg.source][0][index]
    if not name:
        raise DataError(f"data.source=file needs data.{('train', 'eval', 'test')[index]}_file")
    path = resolve_data_file(cfg, name)
    if not path.is_file() and not given and (cfg.hub_id or SOURCE_FILES[cfg.source][1]):
        return _hub_problems(cfg, split, path)
    return read_problems(path, limit)


# ----------------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecialIds:
    start: int
    end: int
    latent: int
    eos: int
    pad: int


@dataclass
class TokenizedProblem:
    question: list[int]
    steps: list[list[int]]
    answer: list[int]  # "### answer" + eos
    raw: dict


def tokenize_problem(problem: dict, tokenizer, eos_id: int, chat_template: bool = False) -> TokenizedProblem:
    if chat_template:
        question = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem["question"]}], add_generation_prompt=True, tokenize=True
        )
        question = list(question["input_ids"] if hasattr(question, "keys") else question)
    else:
        # Coconut encodes the question with add_special_tokens=True: a leading bos for Llama-style tokenizers, nothing
        # for GPT-2. bos_prefix gives the same without the trailing eos that e.g. ByT5 would append.
        question = bos_prefix(tokenizer) + tokenizer.encode(problem["question"] + "\n", add_special_tokens=False)
    steps = [tokenizer.encode(s + "\n", add_special_tokens=False) for s in problem["steps"]]
    answer = tokenizer.encode("### " + problem["answer"], add_special_tokens=False) + [eos_id]
    return TokenizedProblem(question, steps, answer, problem)


def prompt_ids(p: TokenizedProblem, plan: StagePlan, ids: SpecialIds) -> list[int]:
    """What the model sees before it generates: question, then the latents (between markers if the plan has them)."""
    if plan.markers:
        return p.question + [ids.start] + [ids.latent] * plan.n_latents + [ids.end]
    return p.question + [ids.latent] * plan.n_latents if plan.n_latents else p.question


def build_example(p: TokenizedProblem, plan: StagePlan, ids: SpecialIds) -> dict:
    """Training sequence at ``plan``: input_ids, labels (-100 on question/markers/latents), anchor (index where the
    thought, or the first text step, begins; the collator aligns it across the batch)."""
    prompt = prompt_ids(p, plan, ids)
    target = list(itertools.chain.from_iterable(p.steps[plan.steps_skipped :])) + p.answer
    return {"input_ids": prompt + target, "labels": [IGNORE] * len(prompt) + target, "anchor": len(p.question)}


def collate(examples: list[dict], ids: SpecialIds, latent_feedback: bool = True) -> dict[str, torch.Tensor]:
    """Left-pad so every row's anchor sits in one column (their latents then share columns: n latents cost n+1
    passes), right-pad the rest. Returns input_ids, attention_mask, labels, latent_mask, all (B, T)."""
    shift = max(e["anchor"] for e in examples)
    width = max(shift - e["anchor"] + len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), ids.pad, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, e in enumerate(examples):
        left, n = shift - e["anchor"], len(e["input_ids"])
        input_ids[i, left : left + n] = torch.tensor(e["input_ids"])
        labels[i, left : left + n] = torch.tensor(e["labels"])
        mask[i, left : left + n] = 1
    latent_mask = (
        (input_ids == ids.latent) & mask.bool() if latent_feedback else torch.zeros_like(mask, dtype=torch.bool)
    )
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "latent_mask": latent_mask}
