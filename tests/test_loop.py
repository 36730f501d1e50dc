"""The training loop's shortcuts (shared-prefix forward, one forward per group) change speed, not results."""

from __future__ import annotations

import torch

from tests.common import make_adapter, make_tiny_llama, tiny_rows


def _model_and_examples(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bdclean.train.chat import encode

    base = make_tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad")
    tok = AutoTokenizer.from_pretrained(str(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter),
                                      is_trainable=True)
    rows = tiny_rows(6, seed=3)
    rows[0]["output"] = rows[0]["output"] + " " + rows[1]["output"]  # unequal lengths → padding
    return model, tok, [encode(tok, r, 64) for r in rows]


def _losses_and_grads(model, examples, pad_id):
    from bdclean.train.loop import step_loss

    model.zero_grad(set_to_none=True)
    loss = step_loss(model, [examples[:3], examples[3:]], pad_id)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_shared_prefix_and_split_groups_match_plain_forward(tmp_path, monkeypatch):
    import bdclean.train.loop as loop

    model, tok, ex = _model_and_examples(tmp_path)
    L = loop.shared_prefix_len(ex)
    assert 0 < L < min(e.n_prompt for e in ex)  # the template's header is shared, the instruction is not
    monkeypatch.setattr(loop, "MIN_SHARED_PREFIX", 2)  # the tiny template's shared header is short
    fast_loss, fast_grads = _losses_and_grads(model, ex, tok.pad_token_id)
    monkeypatch.setattr(loop, "MIN_SHARED_PREFIX", 10**9)  # plain forward, no prefix sharing
    plain_loss, plain_grads = _losses_and_grads(model, ex, tok.pad_token_id)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(fast_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert any(g.abs().sum() > 0 for g in plain_grads.values())


def test_shared_prefix_len_stops_before_last_prompt_token():
    from bdclean.train.chat import Example
    from bdclean.train.loop import shared_prefix_len

    a = Example([1, 2, 3, 4, 9, 9], n_prompt=4)
    b = Example([1, 2, 3, 4, 8], n_prompt=4)
    assert shared_prefix_len([a, b]) == 3  # token 4 is identical but predicts the response: kept per example
    c = Example([1, 5, 3, 4, 8], n_prompt=4)
    assert shared_prefix_len([a, c]) == 1
