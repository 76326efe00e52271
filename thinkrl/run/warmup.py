"""Language-model warm-up for models built from scratch, before RL.

Thought RL presumes a model that already speaks the language (Quiet-STaR starts from Mistral-7B): a
random network's thoughts are noise that no interpreter can read, and neither side can learn first.
``trainer.lm_warmup_steps`` trains every non-frozen weight group with plain next-token NLL on the training
documents (full text, no thoughts) for that many steps. The initial evaluation comes after the warm-up,
so RL gains are measured from the warmed-up model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from thinkrl.data.positions import PositionStream
from thinkrl.data.windows import Window
from thinkrl.models.shared_prefix import right_pad


def lm_warmup(
    models: list,
    stream: PositionStream,
    steps: int,
    batch_size: int,
    lr: float,
    pad_id: int,
    show_progress: bool = True,
    before_step=None,
) -> float:
    """Train ``models`` as plain LMs on the stream's items (positions: context+target; windows: the whole window).

    Returns the last mean NLL."""
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if not params or steps == 0:
        return float("nan")
    optimizer = torch.optim.AdamW(params, lr=lr)
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc="lm warm-up", disable=not show_progress, dynamic_ncols=True):
        docs = [_tokens(item) for item in stream.next_batch(batch_size)]
        ids, lengths = right_pad(docs, pad_id, models[0].device)
        labels = ids.masked_fill(torch.arange(ids.shape[1], device=ids.device)[None] >= lengths[:, None], -100)
        loss = sum(m(input_ids=ids, labels=labels).loss for m in models) / len(models)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:  # data parallel averaging, or freeing sharded weights gathered in backward
            before_step(params)
        optimizer.step()
        loss_value = float(loss.detach())
    return loss_value


def _tokens(item) -> list[int]:
    if isinstance(item, Window):
        return item.tokens.tolist()
    return item.context_ids + item.target_ids
