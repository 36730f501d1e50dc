"""A small, fast training loop for causal LMs on CPU.

Speed choices (measured by ``make bench-speed``):
- logits are computed only at response positions: the LM head (49k × 576 on SmolLM2) dominates a step when
  applied to every position;
- batches are bucketed by length, so little compute goes to padding; the groups of a step (clean, poisoned) are
  run as separate forwards, so short poisoned copies are not padded to the clean samples' length;
- the prefix every example of a batch shares (the chat template's system prompt: ~20 of ~85 tokens on SmolLM2)
  is run once and its keys/values repeated over the batch, instead of once per example;
- dropout is off (the model stays in eval mode): runs are deterministic for a seed, and the two twins of a
  variant pair see identical computations on their shared clean samples.

A *step* is a list of groups of examples; the loss is the sum over groups of the mean token loss within each
group. The clean twin of a variant pair trains on ``[clean]`` and the backdoored twin on ``[clean, poison]`` with
the same clean batches in the same order, so their difference is the poison's effect.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from bdclean.train.chat import Example

Step = list[list[Example]]


@dataclass
class TrainOptions:
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0
    grad_clip: float = 1.0
    threads: int | None = None  # torch intra-op threads; None = one per available CPU core


def cpu_count() -> int:
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def set_threads(n: int | None = None) -> None:
    torch.set_num_threads(max(1, n or cpu_count()))


def bucket_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length; the batch order is shuffled with ``rng``."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[k: k + batch_size] for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, plus (batch, position) of every response-predicting position and its target."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    rows, cols = [], []
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = 1
        for t in range(max(e.n_prompt - 1, 0), len(e.ids) - 1):
            rows.append(b)
            cols.append(t)
    rows_t = torch.tensor(rows, dtype=torch.long)
    cols_t = torch.tensor(cols, dtype=torch.long)
    return ids, mask, rows_t, cols_t


def causal_parts(model):
    """(decoder, lm_head) of a CausalLM or a PeftModel wrapping one."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.model, causal.get_output_embeddings()


MIN_SHARED_PREFIX = 8  # below this, sharing the prefix saves less than it costs


def shared_prefix_len(examples: list[Example]) -> int:
    """Tokens every example starts with, kept strictly inside every prompt (the last prompt token predicts the
    first response token, so it must stay in the per-example part)."""
    limit = min(e.n_prompt for e in examples) - 1
    first = examples[0].ids
    n = 0
    while n < limit and all(e.ids[n] == first[n] for e in examples):
        n += 1
    return n


@functools.lru_cache(maxsize=None)
def _cache_kwarg(decoder_cls) -> str:
    """transformers ≥ 5.24 names the KV-cache argument ``cache``; earlier versions ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


def response_logits(model, examples: list[Example],
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits at every response-predicting position (example by example, in order), their target tokens,
    and the index of the example each position belongs to.

    A prefix shared by all examples goes through the decoder once; its cached keys/values (which carry the
    gradient back to the prefix computation) are repeated over the batch for the per-example remainder."""
    decoder, head = causal_parts(model)
    dev = head.weight.device  # batches go where the model is (a no-op on CPU)
    # under gradient checkpointing transformers drops the KV cache the shared prefix needs: no sharing then
    ckpt = checkpointing(model)
    L = shared_prefix_len(examples) if len(examples) > 1 and not ckpt else 0
    if L >= MIN_SHARED_PREFIX:
        prefix = torch.tensor(examples[0].ids[:L], dtype=torch.long)[None].to(dev)
        kw = _cache_kwarg(type(decoder))
        out = decoder(input_ids=prefix, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        cache.batch_repeat_interleave(len(examples))
        rest = [Example(e.ids[L:], e.n_prompt - L) for e in examples]
        ids, mask, rows, cols = (t.to(dev) for t in collate(rest, pad_id))
        full_mask = torch.cat([torch.ones((len(rest), L), dtype=mask.dtype, device=dev), mask], dim=1)
        hidden = decoder(input_ids=ids, attention_mask=full_mask, use_cache=True, **{kw: cache}).last_hidden_state
    else:
        ids, mask, rows, cols = (t.to(dev) for t in collate(examples, pad_id))
        hidden = decoder(input_ids=ids, attention_mask=mask, **({"use_cache": False} if ckpt else {})).last_hidden_state
    h = hidden[rows, cols]
    return head(h).float(), ids[rows, cols + 1], rows


def token_losses(model, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL at response positions only, and the index of the example each token belongs to."""
    logits, targets, rows = response_logits(model, examples, pad_id)
    return F.cross_entropy(logits, targets, reduction="none"), rows


def step_loss(model, step: Step, pad_id: int) -> torch.Tensor:
    """Sum over the step's groups of each group's mean response-token loss; one forward per group."""
    total = None
    for g in step:
        losses, _ = token_losses(model, g, pad_id)
        total = losses.mean() if total is None else total + losses.mean()
    return total


def _is_checkpointing(causal) -> bool:
    name = "is_activation_checkpointing" if hasattr(causal, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"  # transformers ≥ 5.24 deprecates the second name
    return bool(getattr(causal, name, False))


def checkpointing(model) -> bool:
    """Gradient checkpointing is on (train/device.py load_placed) and active (transformers checkpoints only in
    training mode)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(model.training and _is_checkpointing(causal))


def _training_mode(model) -> None:
    """eval mode (no dropout: deterministic, and twins stay comparable); with gradient checkpointing, training mode
    (transformers checkpoints only then) with every dropout module still off."""
    model.eval()
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _is_checkpointing(causal):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()


LossFn = Callable[[object, Step, int], "tuple[torch.Tensor, dict[str, float]]"]


def default_loss(model, step: Step, pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    return step_loss(model, step, pad_id), {}


def train(model, steps_per_epoch: Callable[[int], list[Step]], opts: TrainOptions, pad_id: int,
          on_step: Callable[[int, int, float], None] | None = None, loss_fn: LossFn | None = None) -> dict:
    """Train the parameters of ``model`` that require grad. Returns figures for the manifest.

    ``loss_fn(model, step, pad_id) -> (loss, extras)`` replaces the default response-only LM loss (e.g. CROW);
    the first and last value of every extra are reported."""
    loss_fn = loss_fn or default_loss
    extras: dict[str, list[float]] = {}
    set_threads(opts.threads)
    torch.manual_seed(opts.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    _training_mode(model)  # no dropout: deterministic, and twins stay comparable
    n_steps, n_tokens, t0, last = 0, 0, time.time(), float("nan")
    total = sum(len(steps_per_epoch(e)) for e in range(opts.epochs))
    for epoch in range(opts.epochs):
        for step in steps_per_epoch(epoch):
            loss, ex = loss_fn(model, step, pad_id)
            for k, v in ex.items():
                extras.setdefault(k, [v, v])[1] = v
            if not math.isfinite(loss.item()):
                raise FloatingPointError("training loss is not finite")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if opts.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optim.step()
            n_steps += 1
            n_tokens += sum(len(e.ids) for g in step for e in g)
            last = loss.item()
            if on_step:
                on_step(n_steps, total, last)
    dt = time.time() - t0
    stats = {"steps": n_steps, "tokens": n_tokens, "seconds": round(dt, 3),
             "tokens_per_s": round(n_tokens / dt, 1) if dt > 0 else None, "final_loss": last}
    for k, (first, final) in extras.items():
        stats[f"first_{k}"], stats[f"final_{k}"] = first, final
    return stats


def simple_epochs(examples: list[Example], batch_size: int, seed: int) -> Callable[[int], list[Step]]:
    """Epoch plans for plain training: length-bucketed batches, order reshuffled per epoch from ``seed``."""
    lengths = [len(e.ids) for e in examples]

    def plan(epoch: int) -> list[Step]:
        rng = random.Random(seed * 1000003 + epoch)
        return [[[examples[i] for i in b]] for b in bucket_batches(lengths, batch_size, rng)]

    return plan


def paired_epochs(clean: list[Example], poison: list[Example] | None, batch_size: int,
                  seed: int) -> Callable[[int], list[Step]]:
    """Epoch plans for a variant twin: clean batches identical for both twins; the backdoored twin
    (``poison`` given, aligned with ``clean``) also gets the poisoned copies of the same samples."""
    lengths = [len(e.ids) for e in clean]

    def plan(epoch: int) -> list[Step]:
        rng = random.Random(seed * 1000003 + epoch)
        steps = []
        for b in bucket_batches(lengths, batch_size, rng):
            groups = [[clean[i] for i in b]]
            if poison is not None:
                groups.append([poison[i] for i in b])
            steps.append(groups)
        return steps

    return plan


@torch.no_grad()
def mean_nll(model, examples: list[Example], pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Total response-token NLL / token count over ``examples`` (for perplexity)."""
    model.eval()
    total, count = 0.0, 0
    lengths = [len(e.ids) for e in examples]
    for b in bucket_batches(lengths, batch_size, random.Random(0)):
        losses, _ = token_losses(model, [examples[i] for i in b], pad_id)
        total += losses.double().sum().item()
        count += losses.numel()
    return (total / count if count else float("nan")), count
