"""Batched greedy generation with left padding, in the model's chat template."""

from __future__ import annotations

from typing import Callable

import torch

from bdclean.train.chat import prompt_ids


@torch.no_grad()
def generate(model, tok, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 16,
             max_prompt: int = 256, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy completions for ``rows`` (Alpaca dicts), in input order. Deterministic on CPU."""
    from bdclean.train.loop import set_threads

    set_threads()
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [prompt_ids(tok, r)[-max_prompt:] for r in rows]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    outs: list[str] = [""] * len(rows)
    for k in range(0, len(order), batch_size):
        idx = order[k: k + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            p = prompts[i]
            ids[b, T - len(p):] = torch.tensor(p)
            mask[b, T - len(p):] = 1
        dev = model.device  # the batch goes to the model's device and the tokens come back (no-ops on CPU)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id).cpu()
        for b, i in enumerate(idx):
            outs[i] = tok.decode(gen[b, T:], skip_special_tokens=True).strip()
        if on_batch:
            on_batch(len(idx))
    return outs
