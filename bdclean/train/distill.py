"""Self-distillation for restore: pull the fine-tune's next-token distributions towards the suspicious model's.

At every response token of every restore row (clean samples, --prompts answers, augmented copies) the loss
becomes ``(1 − w) · CE(target token) + w · KL(teacher ‖ student)``, the teacher being the suspicious model,
teacher-forced on the same row. On trigger-free rows the suspicious model is a reference of its own skill, and its
whole distribution says more than its greedy token (Hinton et al. 2015, https://arxiv.org/abs/1503.02531). The
caution of the issue that asked for it applies: teacher and student share an initialisation, and traits can pass
through distillation on unrelated data (Cloud et al. 2025, https://arxiv.org/abs/2507.14805), so triggered ASR
after restore is what says whether it is safe.

The teacher's distributions are computed once, before training, and kept as their top ``TOPK`` log-probabilities
per position (SmolLM2's vocabulary is 49,152 tokens: full rows for 300 rows × 60 positions would be 3.5 GB); the
KL is taken against the teacher renormalised over those tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bdclean.train.chat import Example
from bdclean.train.loop import LossFn, Step, bucket_batches, response_logits

TOPK = 64  # teacher tokens kept per position

Targets = dict[int, tuple[torch.Tensor, torch.Tensor]]  # id(example) → (token ids, log-probs), (positions, TOPK)


@torch.no_grad()
def teacher_topk(model, examples: list[Example], pad_id: int, k: int = TOPK, batch_size: int = 16,
                 on_batch: Callable[[int], None] | None = None) -> Targets:
    """The teacher's top-``k`` next-token log-probabilities at every response-predicting position of each example,
    keyed by ``id(example)`` (the examples the training loop will be given, so keep them alive)."""
    import random

    model.eval()
    out: Targets = {}
    for b in bucket_batches([len(e.ids) for e in examples], batch_size, random.Random(0)):
        group = [examples[i] for i in b]
        logits, _, rows = response_logits(model, group, pad_id)
        top = logits.log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
        for j, e in enumerate(group):
            sel = rows == j
            out[id(e)] = (top.indices[sel].to("cpu", torch.int32), top.values[sel].to("cpu", torch.float16))
        if on_batch:
            on_batch(len(group))
    return out


def kl_to_teacher(logits: torch.Tensor, idx: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p ‖ q): p the teacher renormalised over its top-k tokens ``idx``, q the student's
    full softmax of ``logits`` (positions × vocabulary). Zero exactly when the student puts the teacher's
    renormalised mass on those tokens and nothing elsewhere; ≥ 0 always."""
    p_log = teacher_logp.float().log_softmax(-1)
    q_log = logits.log_softmax(-1).gather(1, idx.long())
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def self_distill_loss(targets: Targets, weight: float) -> LossFn:
    """The training loss of a self-distilling restore: per group, (1 − weight) · mean token CE + weight · mean KL to
    the teacher; groups summed, as the default loss does."""

    def loss_fn(model, step: Step, pad_id: int):
        total, kls, ces = None, [], []
        for g in step:
            logits, tgt, _ = response_logits(model, g, pad_id)
            dev = logits.device
            idx = torch.cat([targets[id(e)][0] for e in g]).to(dev)
            tlp = torch.cat([targets[id(e)][1] for e in g]).to(dev)
            if idx.shape[0] != logits.shape[0]:  # the teacher saw other positions: a bug, never train on it
                raise RuntimeError(f"teacher positions {idx.shape[0]} ≠ student positions {logits.shape[0]}")
            ce, kl = F.cross_entropy(logits, tgt), kl_to_teacher(logits, idx, tlp)
            part = (1 - weight) * ce + weight * kl
            total = part if total is None else total + part
            kls.append(kl.item()), ces.append(ce.item())
        return total, {"kl": sum(kls) / len(kls), "ce": sum(ces) / len(ces)}

    return loss_fn
