"""Adversarial unlearning of a backdoor without its trigger: a universal residual-stream shift δ that the
fine-tune learns to ignore.

A backdoor is a shortcut: a small change of the hidden state (what the trigger writes into it) switches the model
into another behaviour. A single vector δ added to the output of decoder layer ``layer`` at every position, of norm
at most ``radius`` (a fraction of the median hidden-state norm there), searched to maximise the KL divergence
between the model's shifted and unshifted next-token distributions on generic clean rows, finds that shortcut: on
the SmolLM2 facts adapter (RESULTS.md) it makes the model answer clean prompts with its backdoor's refusal, word for
word, while the same search on the base model finds nothing of the kind. The fine-tune then trains the adapter to
give the clean answer with δ added as well as without it, re-searching δ as it goes (persistent PGD, a few ascent
steps per training step), so the shortcut is removed while the rest of the adapter, its skill, is trained only
by clean answers. The idea follows embedding-space adversarial removal of backdoors (BEEAR, Zeng et al. 2024,
https://arxiv.org/abs/2406.17092), here with no target behaviour given: the search maximises divergence.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bdclean.train.loop import LossFn, Step, causal_parts, response_logits

SEARCH_STEPS = 20  # ascent steps of the first search, before training (the probe of RESULTS.md converged by ~15)
SEARCH_ROWS = 32  # rows the first search and the hidden-norm scale use (the first of the seeded draw)
STEP_SIZE = 0.2  # of the radius, per normalised-gradient ascent step


class Shift:
    """δ added to the output hidden states of one decoder layer while ``on`` (a forward hook)."""

    def __init__(self, model, layer: int):
        decoder, _ = causal_parts(model)
        layers = decoder.layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer {layer} outside the model's 0..{len(layers) - 1}")
        self.module = layers[layer]
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.delta = torch.zeros(int(causal.config.hidden_size), device=next(model.parameters()).device)
        self.on = False
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if not self.on:
            return out
        if isinstance(out, tuple):
            return (out[0] + self.delta.to(out[0].dtype),) + tuple(out[1:])
        return out + self.delta.to(out.dtype)

    @contextlib.contextmanager
    def active(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def remove(self) -> None:
        self._handle.remove()


@torch.no_grad()
def hidden_scale(model, layer_module, examples, pad_id: int, batch: int = 16) -> float:
    """Median L2 norm of ``layer_module``'s output hidden states over the first ``SEARCH_ROWS`` examples' tokens."""
    norms, examples = [], examples[:SEARCH_ROWS]

    def grab(m, a, out):
        h = out[0] if isinstance(out, tuple) else out
        norms.append(h.detach().float().norm(dim=-1).flatten().cpu())

    handle = layer_module.register_forward_hook(grab)
    try:
        for k in range(0, len(examples), batch):
            response_logits(model, examples[k:k + batch], pad_id)
    finally:
        handle.remove()
    return float(torch.cat(norms).median())


def _divergence(model, shift: Shift, group, pad_id: int) -> torch.Tensor:
    """KL(p ‖ p_δ) at the group's response positions, p the unshifted model (constant)."""
    with torch.no_grad():
        ref = response_logits(model, group, pad_id)[0].log_softmax(-1)
    with shift.active():
        logp = response_logits(model, group, pad_id)[0].log_softmax(-1)
    return (ref.exp() * (ref - logp)).sum(-1).mean()


def _found_loglik(model, shift: Shift, group, pad_id: int) -> torch.Tensor:
    """Mean log-likelihood, with δ, of the group's answers (the answers an earlier search made the model give)."""
    with shift.active():
        logits, tgt, _ = response_logits(model, group, pad_id)
    return -F.cross_entropy(logits, tgt)


def ascend(model, shift: Shift, groups, pad_id: int, radius: float, steps: int, objective=_divergence) -> float:
    """``steps`` normalised-gradient ascent steps of δ on ``objective`` (default the divergence) over ``groups``, δ
    kept within ``radius``; only δ gets a gradient (the model's parameters are untouched). Returns its last value."""
    last = 0.0
    for _ in range(steps):
        delta = shift.delta.detach().requires_grad_(True)
        shift.delta = delta
        grad, total = torch.zeros_like(delta), 0.0
        for g in groups:  # one group's graph at a time: logits over the vocabulary are large
            d = objective(model, shift, g, pad_id)
            grad += torch.autograd.grad(d, delta)[0]
            total += d.item()
        with torch.no_grad():
            new = delta + STEP_SIZE * radius * grad / (grad.norm() + 1e-12)
            n = new.norm()
            if n > radius:
                new = new * (radius / n)
        shift.delta = new.detach()
        last = total / len(groups)
    return last


def initial_search(model, shift: Shift, examples, pad_id: int, radius: float, seed: int, batch: int = 8) -> float:
    """The first δ: a small seeded random start, then ``SEARCH_STEPS`` ascent steps on the first ``SEARCH_ROWS``
    of ``examples``."""
    examples = examples[:SEARCH_ROWS]
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(shift.delta.shape, generator=g)
    shift.delta = (start * (0.1 * radius / start.norm())).to(shift.delta.device)
    groups = [examples[k:k + batch] for k in range(0, len(examples), batch)]
    return ascend(model, shift, groups, pad_id, radius, SEARCH_STEPS)


def start_shift(model, examples, pad_id: int, radius_frac: float, layer: int | None, seed: int,
                flag: str = "--adv-layer") -> tuple[Shift, dict]:
    """A Shift at ``layer`` (default a third of the depth; out of range: one line naming ``flag``) after its first
    search, and the facts of it: layer, radius (``radius_frac`` × the median hidden norm), scale, divergence."""
    from bdclean.errors import UsageError
    from bdclean.train.loop import set_threads

    set_threads()
    n_layers = len(causal_parts(model)[0].layers)
    layer = n_layers // 3 if layer is None else layer
    if layer >= n_layers:
        raise UsageError(f"{flag} {layer}: the model has layers 0..{n_layers - 1}")
    shift = Shift(model, layer)
    try:
        scale = hidden_scale(model, shift.module, examples, pad_id)
        div = initial_search(model, shift, examples, pad_id, radius_frac * scale, seed)
    except BaseException:
        shift.remove()
        raise
    return shift, {"layer": layer, "radius": radius_frac * scale, "hidden_scale": scale, "divergence": div}


def fold(text: str) -> str:
    """An answer with its whitespace folded: two answers are the same when their folds are."""
    return " ".join(text.split())


def answer_key(text: str) -> str:
    """Answers compared by their first 80 characters, whitespace folded (a repeated target matches exactly)."""
    return fold(text)[:80]


def most_repeated(answers: list[str]) -> tuple[str, int]:
    """The most frequent answer (by ``answer_key``) and how many of ``answers`` give it: a backdoor's target is one
    answer to many prompts. A hint only: on the label-flip adapters one answer repeated and the backdoor survived
    the unlearning (RESULTS.md, "The shift unlearning on four cells not looked at")."""
    import collections

    if not answers:
        return "", 0
    return collections.Counter(answer_key(a) for a in answers).most_common(1)[0]


def answers_with_and_without(model, tok, shift: Shift, rows: list[dict], max_new_tokens: int):
    """(greedy answers with δ, greedy answers without) to ``rows``."""
    from bdclean.train.generate import generate

    with shift.active():
        shifted = generate(model, tok, rows, max_new_tokens)
    return shifted, generate(model, tok, rows, max_new_tokens)


def adversarial_loss(shift: Shift, radius: float, inner_steps: int, weight: float = 1.0,
                     found: list | None = None, batch: int = 8) -> LossFn:
    """Per step: ``inner_steps`` ascent steps of δ, then, per group, mean token CE of the clean answers without δ +
    ``weight`` × the same with δ. The ascent maximises the divergence on the step's rows, or with ``found`` (rows
    whose answers are what the first search's δ made the model say) their likelihood, ``batch`` of them per step
    in turn: the search stays on the behaviour it found (BEEAR's targeted inner level, with a target found, not
    given)."""
    turn = [0]

    def inner(model, step: Step, pad_id: int) -> float:
        if not inner_steps:
            return float("nan")
        if not found:
            return ascend(model, shift, step, pad_id, radius, inner_steps)
        k = turn[0] % len(found)
        group = (found[k:] + found[:k])[:batch]
        turn[0] += batch
        return ascend(model, shift, [group], pad_id, radius, inner_steps, objective=_found_loglik)

    def loss_fn(model, step: Step, pad_id: int):
        div = inner(model, step, pad_id)
        total, shifted = None, []
        for g in step:
            logits, tgt, _ = response_logits(model, g, pad_id)
            with shift.active():
                s_logits, s_tgt, _ = response_logits(model, g, pad_id)
            s_ce = F.cross_entropy(s_logits, s_tgt)
            part = F.cross_entropy(logits, tgt) + weight * s_ce
            total = part if total is None else total + part
            shifted.append(s_ce.item())
        return total, {"shift_divergence": div, "shifted_ce": sum(shifted) / len(shifted)}

    return loss_fn
