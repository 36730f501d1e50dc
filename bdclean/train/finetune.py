"""The clean fine-tune shared by restore, the τ-auto mini restores and the lab's baselines."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bdclean.console import progress

if TYPE_CHECKING:
    from bdclean.config import RestoreOptions

DEFAULT_LR = {"adapter": 2e-4, "full": 1e-5}
# Trigger-invariance copies per restore row when --augment is not given. Adapters: 2, chosen on the BadNets label
# cell and checked on cells not looked at (RESULTS.md, "--augment 2 becomes the adapter default"); full checkpoints
# without a base: 0, never measured there.
DEFAULT_AUGMENT = {"adapter": 2.0, "full": 0.0}


def with_defaults(opts, kind: str):
    """``opts`` (RestoreOptions or DefendOptions) with the per-kind defaults that stay ``None`` until the model's
    kind is known ("adapter" or "full") filled in, so fingerprints and manifests record what ran."""
    return opts.model_copy(update={"lr": opts.lr or DEFAULT_LR[kind],
                                   "augment": DEFAULT_AUGMENT[kind] if opts.augment is None else opts.augment})


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

    clean_rows = clean_draw(clean, opts)
    rows = clean_rows + list(extra_rows or [])
    augmented = []
    if opts.augment is None:  # resolved by with_defaults() before any fingerprint is taken
        raise ValueError("restore options reached the fine-tune with augment unresolved")
    if opts.augment > 0:
        from bdclean.train.augment import augment_rows, vocabulary

        augmented = augment_rows(rows, opts.augment, opts.seed + 1, vocabulary(tok))
        rows += augmented
    examples = [encode(tok, r, opts.max_len) for r in rows]
    if opts.self_distill > 0 or opts.adversarial > 0:
        if loss_fn is not None or (opts.self_distill > 0 and (teacher is None or opts.adversarial > 0)):
            raise ValueError("self-distillation needs a teacher; it, the adversarial shift and a custom loss exclude "
                             "each other")
    shift, facts = None, {}
    if opts.self_distill > 0:
        loss_fn = _distill_loss(teacher, examples, tok.pad_token_id, opts.self_distill, label)
    elif opts.adversarial > 0:
        # the first search on the task prompts' rows when there are any (the probe found the backdoor's answer on
        # task inputs, RESULTS.md), else on the clean rows
        first = len(clean_rows) if extra_rows else 0
        last = len(rows) - len(augmented)  # the search sees the rows themselves, not their augmented copies
        loss_fn, shift, facts = _adversarial_loss(model, tok, rows[first:last], examples[first:last], opts, label)
    plan = simple_epochs(examples, opts.batch_size, opts.seed)
    try:
        with progress() as bar:
            task = bar.add_task(label, total=sum(len(plan(e)) for e in range(opts.epochs)))
            stats = train(model, plan, TrainOptions(opts.epochs, lr, opts.batch_size, opts.seed), tok.pad_token_id,
                          on_step=lambda k, tot, loss: bar.update(task, completed=k,
                                                                  description=f"{label} loss {loss:.3f}"),
                          loss_fn=loss_fn)
    finally:
        if shift is not None:
            shift.remove()
    stats = {**stats, **facts}
    return {**stats, "augmented_rows": len(augmented)} if augmented else stats


def _distill_loss(teacher: Callable[[], object], examples: list, pad_id: int, weight: float, label: str):
    from bdclean.train.distill import self_distill_loss, teacher_topk

    model = teacher()
    with progress() as bar:
        task = bar.add_task(f"{label}: the suspicious model's distributions", total=len(examples))
        targets = teacher_topk(model, examples, pad_id, on_batch=lambda k: bar.update(task, advance=k))
    del model
    return self_distill_loss(targets, weight)


def _adversarial_loss(model, tok, rows: list[dict], examples: list, opts: RestoreOptions, label: str):
    """(loss, shift, facts): the adversarial-unlearning loss of train/adversarial.py with its first search done."""
    from bdclean.console import log
    from bdclean.train.adversarial import (SEARCH_ROWS, adversarial_loss, answers_with_and_without, fold,
                                           most_repeated, start_shift)

    shift, f = start_shift(model, examples, tok.pad_token_id, opts.adversarial, opts.adv_layer, opts.seed)
    log(f"{label}: shift at layer {f['layer']}, radius {f['radius']:.3g} ({opts.adversarial:g} × median hidden "
        f"norm {f['hidden_scale']:.3g}); the first search changes the answers by KL {f['divergence']:.3g} nats per "
        "token")
    facts = {"adv_layer": f["layer"], "adv_radius": round(f["radius"], 6),
             "adv_hidden_scale": round(f["hidden_scale"], 6), "adv_first_divergence": round(f["divergence"], 6)}
    found = None
    if opts.adv_target == "found":
        from bdclean.train.chat import encode

        probe_rows = rows[:SEARCH_ROWS]
        shifted, plain = answers_with_and_without(model, tok, shift, probe_rows, 48)
        changed = [(r, a) for r, a, b in zip(probe_rows, shifted, plain) if a.strip() and fold(a) != fold(b)]
        found = [encode(tok, r, opts.max_len, output=a) for r, a in changed]
        top, count = most_repeated([a for _, a in changed])
        facts["adv_found"] = len(found)
        facts["adv_found_examples"] = [a for a, b in zip(shifted, plain) if a != b][:3]
        facts["adv_top_answer"], facts["adv_top_count"] = top, count
        log(f"{label}: the shift changed {len(found)} of {len(probe_rows)} answers; its re-search keeps to them. "
            f"Its most repeated answer, to {count} of {len(probe_rows)}: {top!r}" + (
                "" if count * 4 >= len(probe_rows) else " (no answer repeats: the search found no single target, "
                "and on such a cell the backdoor survived; RESULTS.md, 2026-12-02 afternoon)"))
    return adversarial_loss(shift, f["radius"], opts.adv_steps, found=found), shift, facts


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
