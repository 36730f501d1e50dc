"""The clean fine-tune shared by restore, the τ-auto mini restores and the lab's baselines."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bdclean.console import progress

if TYPE_CHECKING:
    from bdclean.config import RestoreOptions

DEFAULT_LR = {"adapter": 2e-4, "full": 1e-5}


def clean_draw(clean: str, opts: RestoreOptions) -> list[dict]:
    """The ``opts.samples`` clean rows a fine-tune trains on (seeded by ``opts.seed``)."""
    from bdclean.io.data import load_instructions

    pool = load_instructions(clean)
    return random.Random(opts.seed).sample(pool, min(opts.samples, len(pool)))


def finetune(model, tok, clean: str, opts: RestoreOptions, lr: float, label: str, loss_fn=None,
             extra_rows: list[dict] | None = None, teacher: Callable[[], object] | None = None) -> dict:
    """Train ``model`` in place on ``opts.samples`` seeded clean samples of ``clean`` (plus ``extra_rows``, plus
    ``opts.augment`` trigger-invariance copies per row) for ``opts.epochs`` at ``lr``; returns the loop's stats.

    The recipe of restore, of the τ-auto mini restores and of the lab's fine-tuning baselines. ``loss_fn``
    replaces the LM loss (CROW). With ``opts.self_distill`` > 0, ``teacher()`` loads the model whose next-token
    distributions the loss also matches (train/distill.py); it is freed before training starts."""
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, simple_epochs, train

    rows = clean_draw(clean, opts) + list(extra_rows or [])
    augmented = []
    if opts.augment > 0:
        from bdclean.train.augment import augment_rows, vocabulary

        augmented = augment_rows(rows, opts.augment, opts.seed + 1, vocabulary(tok))
        rows += augmented
    examples = [encode(tok, r, opts.max_len) for r in rows]
    if opts.self_distill > 0:
        if teacher is None or loss_fn is not None:
            raise ValueError("self-distillation needs a teacher and the default loss")
        loss_fn = _distill_loss(teacher, examples, tok.pad_token_id, opts.self_distill, label)
    plan = simple_epochs(examples, opts.batch_size, opts.seed)
    with progress() as bar:
        task = bar.add_task(label, total=sum(len(plan(e)) for e in range(opts.epochs)))
        stats = train(model, plan, TrainOptions(opts.epochs, lr, opts.batch_size, opts.seed), tok.pad_token_id,
                      on_step=lambda k, tot, loss: bar.update(task, completed=k, description=f"{label} loss {loss:.3f}"),
                      loss_fn=loss_fn)
    return {**stats, "augmented_rows": len(augmented)} if augmented else stats


def _distill_loss(teacher: Callable[[], object], examples: list, pad_id: int, weight: float, label: str):
    from bdclean.train.distill import self_distill_loss, teacher_topk

    model = teacher()
    with progress() as bar:
        task = bar.add_task(f"{label}: the suspicious model's distributions", total=len(examples))
        targets = teacher_topk(model, examples, pad_id, on_batch=lambda k: bar.update(task, advance=k))
    del model
    return self_distill_loss(targets, weight)


def finetune_adapter(adapter_dir: Path, base_dir: Path, clean: str, opts: RestoreOptions, label: str,
                     tensors: dict | None = None, loss_fn=None, extra_rows: list[dict] | None = None,
                     teacher: Callable[[], object] | None = None) -> tuple[dict, dict, dict]:
    """Fine-tune an adapter on ``opts.samples`` clean samples; returns (config, tensors, stats).

    ``tensors`` replaces the adapter's own weights (e.g. after pruning); ``loss_fn`` replaces the LM loss;
    ``teacher`` as in ``finetune``."""
    from bdclean.io.models import load_adapter, load_tokenizer
    from bdclean.io.peft_io import adapter_state, attach
    from bdclean.train.device import load_placed

    info = load_adapter(adapter_dir)
    tok = load_tokenizer(base_dir)
    model = attach(load_placed(base_dir), info, tensors)  # PEFT keeps the LoRA in float32 over a bf16 base
    stats = finetune(model, tok, clean, opts, opts.lr or DEFAULT_LR["adapter"], label, loss_fn, extra_rows, teacher)
    return info.config, adapter_state(model), stats
