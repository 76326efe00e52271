"""Scoring C candidate answers in one two-level forward equals scoring each candidate on its own."""

from __future__ import annotations

import pytest
import torch

from thinkrl.config import load_config
from thinkrl.models.roles import build_roles
from thinkrl.rl.scoring import Scorer
from thinkrl.rollout.hf_actor import HFRolloutActor


def _setup(groups: str, head: str, reward_source: str = "mixed"):
    cfg = load_config(
        "configs/default.yaml",
        [f"model.weight_groups=[{groups}]", f"head.form={head}", "data.interpreter_window=0", "model.freeze=[]"],
    )
    torch.manual_seed(0)
    roles = build_roles(cfg)
    with torch.no_grad():  # zero-init heads would hide a wrong base/interpreter pairing
        for p in roles.head.parameters():
            p.normal_(0, 0.3)
    return cfg, roles, Scorer(roles, [5, 6], 0, reward_source)


@pytest.mark.parametrize(
    "groups,head,source", [("A,B,A", "gate", "mixed"), ("A,B,C", "mlp", "interpreter"), ("A,A,A", "none", "mixed")]
)
def test_candidates_equal_one_by_one(groups, head, source):
    cfg, roles, scorer = _setup(groups, head, source)
    contexts = [[1, 7, 8, 9, 10, 11], [1, 12, 13]]  # different lengths: left padding in the prefix
    candidates = [[[7], [8, 9, 10], [11, 12]], [[13, 14], [9], [10, 11, 12]]]  # lengths differ: right padding
    actor = HFRolloutActor(cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, 0)
    thoughts = actor.sample(contexts, 3, [11, 12])
    logp, logp_reward, logp_base, _, mask = scorer.candidates(contexts, candidates, thoughts)
    for j in range(3):
        single = scorer.score(contexts, [cands[j] for cands in candidates], thoughts)
        for i in range(2):
            n = len(candidates[i][j])
            assert mask[i, j].sum() == n
            torch.testing.assert_close(logp[i, :, j, :n], single.logp[i, :, :n], atol=2e-5, rtol=0)
            torch.testing.assert_close(logp_reward[i, :, j, :n], single.logp_reward[i, :, :n], atol=2e-5, rtol=0)
            torch.testing.assert_close(logp_base[i, j, :n], single.logp_base[i, :n], atol=2e-5, rtol=0)
