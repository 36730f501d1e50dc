"""Self-distillation of the restoring fine-tune (train/distill.py, --self-distill)."""

import json

import torch
from safetensors.torch import load_file

from bdclean.config import RestoreOptions
from bdclean.train.chat import Example
from bdclean.train.distill import kl_to_teacher, self_distill_loss, teacher_topk

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]


def test_kl_to_teacher_is_zero_only_at_the_teacher_and_positive_elsewhere():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g)
    full = logits.log_softmax(-1).topk(11, dim=-1)
    assert abs(kl_to_teacher(logits, full.indices, full.values).item()) < 1e-6  # every token kept: exact KL
    assert kl_to_teacher(torch.randn(5, 11, generator=g), full.indices, full.values).item() > 0.05
    top = logits.log_softmax(-1).topk(3, dim=-1)  # top 3: the student also spends mass off those tokens
    kl = kl_to_teacher(logits, top.indices, top.values).item()
    assert kl > 0
    peaked = logits.clone()
    peaked.scatter_(1, top.indices, 0.0)
    peaked.scatter_add_(1, top.indices, top.values + 30)  # the teacher's renormalised top 3, nothing else
    assert kl_to_teacher(peaked, top.indices, top.values).item() < min(kl, 1e-6)


def _tiny_models(tiny_base, tiny_adapter):
    from bdclean.io.models import load_adapter, load_model, load_tokenizer, read_model_config
    from bdclean.io.peft_io import attach
    from bdclean.lab.defend import reset_tensors

    info = load_adapter(tiny_adapter)
    reset, _ = reset_tensors(info, read_model_config(tiny_base))
    return (lambda: attach(load_model(tiny_base), info).merge_and_unload()), reset, load_tokenizer(tiny_base)


def test_teacher_topk_covers_every_response_position(tiny_base, tiny_adapter, tiny_data):
    from bdclean.io.data import load_instructions
    from bdclean.train.chat import encode
    from bdclean.train.loop import response_logits

    teacher, _, tok = _tiny_models(tiny_base, tiny_adapter)
    examples = [encode(tok, r, 48) for r in load_instructions(str(tiny_data))[:6]]
    model = teacher()
    targets = teacher_topk(model, examples, tok.pad_token_id, k=5, batch_size=4)
    assert set(targets) == {id(e) for e in examples}
    for e in examples:
        idx, logp = targets[id(e)]
        assert idx.shape == logp.shape == (len(e.ids) - e.n_prompt, 5)  # positions n_prompt-1 … len-2
        # the same as the teacher's own distribution at those positions, example by example
        logits, _, _ = response_logits(model, [e], tok.pad_token_id)
        ref = logits.log_softmax(-1).topk(5, dim=-1)
        assert torch.equal(idx.long(), ref.indices) and torch.allclose(logp.float(), ref.values, atol=2e-2)
    # the loss refuses a step whose positions the teacher did not see
    short = Example(examples[0].ids[:-1], examples[0].n_prompt)
    targets[id(short)] = targets[id(examples[0])]
    try:
        self_distill_loss(targets, 1.0)(model, [[short]], tok.pad_token_id)
    except RuntimeError as e:
        assert "teacher positions" in str(e)
    else:
        raise AssertionError("mismatched positions were trained on")


def test_self_distilled_restore_moves_the_model_towards_the_teacher(tiny_base, tiny_adapter, tiny_data):
    """From the reset adapter (ΔW = 0), the same fine-tune with the KL loss ends closer to the suspicious adapter's
    distributions on its rows than the plain CE fine-tune does: measured, not assumed."""
    from bdclean.io.models import load_adapter, load_model
    from bdclean.io.peft_io import attach
    from bdclean.train.chat import encode
    from bdclean.train.finetune import clean_draw, finetune_adapter
    from bdclean.train.loop import response_logits

    teacher, reset, tok = _tiny_models(tiny_base, tiny_adapter)
    info = load_adapter(tiny_adapter)
    base_opts = dict(samples=16, epochs=4, lr=5e-3, batch_size=4, max_len=48, seed=0, augment=0)

    def kl_after(weight: float) -> tuple[float, dict]:
        opts = RestoreOptions(**base_opts, self_distill=weight)
        _, tensors, stats = finetune_adapter(tiny_adapter, tiny_base, str(tiny_data), opts, "t", tensors=dict(reset),
                                             teacher=teacher)
        student = attach(load_model(tiny_base), info, tensors).merge_and_unload()
        rows = clean_draw(str(tiny_data), opts)
        examples = [encode(tok, r, 48) for r in rows]
        t, s = (response_logits(m, examples, tok.pad_token_id)[0] for m in (teacher(), student))
        kl = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
        return kl.item(), stats

    kl_ce, stats_ce = kl_after(0.0)
    kl_kd, stats_kd = kl_after(1.0)
    assert "final_kl" not in stats_ce and stats_kd["final_kl"] < stats_kd["first_kl"]
    assert kl_kd < 0.5 * kl_ce, (kl_kd, kl_ce)


def test_defend_and_restore_with_self_distill(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    plain, kd = tmp_path / "reset", tmp_path / "reset-kd"
    assert run_cli("defend", "reset", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", plain,
                   *FAST)[0] == 0
    code, _, err = run_cli("defend", "reset", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", kd,
                           "--self-distill", "0.5", *FAST)
    assert code == 0, err
    # off: no key, so the fingerprints of outputs made before the option existed are unchanged
    assert "self_distill" not in json.loads((plain / "manifest.json").read_text())["config"]
    man = json.loads((kd / "manifest.json").read_text())
    assert man["config"]["self_distill"] == 0.5 and "final_kl" in man["extra"]["train"]
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (plain, kd))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for method, value, word in (("crow", "0.5", "crow"), ("reset", "2", "self_distill"),
                                ("reset", "nan", "self_distill")):
        out = tmp_path / f"bad-{method}-{value}"
        code, _, err = run_cli("defend", method, tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out",
                               out, "--self-distill", value, *FAST)
        assert code == 2 and word in err.lower() and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_purify_with_self_distill_records_it_and_restore_reruns_without(tmp_path, run_cli, tiny_base, tiny_adapter,
                                                                         tiny_data):
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("pairs:\n  epochs: 1\n  batch_size: 4\n  max_len: 48\nrestore:\n  samples: 8\n  epochs: 1\n"
                   "  max_len: 48\nscore:\n  tau: 0.25\n")
    out = tmp_path / "run"
    code, _, err = run_cli("purify", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", out,
                           "--config", cfg, "--n-variants", "3", "--samples", "8", "--self-distill", "1")
    assert code == 0, err
    man = json.loads((out / "purified" / "manifest.json").read_text())
    assert man["config"]["self_distill"] == 1.0 and man["extra"]["final_ce"] > 0
    assert "self-distillation: loss 0·CE + 1·KL" in (out / "purified" / "README.md").read_text()
    kd = load_file(str(out / "purified" / "adapter_model.safetensors"))
    code, _, err = run_cli("restore", "--out", out, "--clean", tiny_data, "--config", cfg)  # option off: reruns
    assert code == 0 and "skip" not in err, err
    assert "self_distill" not in json.loads((out / "purified" / "manifest.json").read_text())["config"]
    plain = load_file(str(out / "purified" / "adapter_model.safetensors"))
    assert any(not torch.equal(kd[k], plain[k]) for k in kd)
