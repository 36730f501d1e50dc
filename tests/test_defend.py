"""Baseline defenses (adapter-only threat model) and `compare`, on tiny models."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bdclean.lab.quant import max_distinct_per_group, quantize_rtn_int4
from tests.common import compare_inputs, tiny_rows, write_rows

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture()
def cli(run_cli):
    """The real CLI, in-process (conftest's run_cli); returns (exit code, stdout, stderr)."""
    return run_cli


def _key(layer, mod, ab):
    return f"base_model.model.model.layers.{layer}.mlp.{mod}.lora_{ab}.weight"


def _load_peft(base, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(folder))


def test_unknown_method_is_a_usage_error(cli, tiny_base, tiny_adapter, tmp_path):
    code, _, err = cli("defend", "distill", tiny_adapter, "--base", tiny_base, "--out", tmp_path / "x")
    assert code == 2
    assert "unknown defense 'distill'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_prune_zeroes_the_smallest_channels(cli, tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "prune"
    code, _, err = cli("defend", "prune", tiny_adapter, "--base", tiny_base, "--tau", "0.25", "--out", out)
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra"]["selection"].startswith("smallest") and man["wall_time_s"] >= 0
    orig = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    new = load_file(str(out / "adapter_model.safetensors"))
    scale = json.loads((tiny_adapter / "adapter_config.json").read_text())
    s = scale["lora_alpha"] / scale["r"]
    # channel norms from dense ΔW, independently of core.channels
    norms = torch.stack([torch.cat([
        (s * orig[_key(l, "gate_proj", "B")] @ orig[_key(l, "gate_proj", "A")]).double(),
        (s * orig[_key(l, "up_proj", "B")] @ orig[_key(l, "up_proj", "A")]).double(),
        (s * orig[_key(l, "down_proj", "B")] @ orig[_key(l, "down_proj", "A")]).double().T], dim=1).norm(dim=1)
        for l in range(2)])
    pruned = torch.stack([new[_key(l, "gate_proj", "B")].abs().sum(1) == 0 for l in range(2)])
    assert int(pruned.sum()) == math.ceil(0.25 * norms.numel()) == man["extra"]["channels_pruned"]
    assert norms[pruned].max() <= norms[~pruned].min()  # the smallest-magnitude channels went
    for l in range(2):
        idx = pruned[l].nonzero().flatten()
        keep = (~pruned[l]).nonzero().flatten()
        assert torch.count_nonzero(new[_key(l, "up_proj", "B")][idx]) == 0
        assert torch.count_nonzero(new[_key(l, "down_proj", "A")][:, idx]) == 0
        assert torch.equal(new[_key(l, "gate_proj", "B")][keep], orig[_key(l, "gate_proj", "B")][keep])
        assert torch.equal(new[_key(l, "down_proj", "A")][:, keep], orig[_key(l, "down_proj", "A")][:, keep])
    attn = _key(0, "gate_proj", "A").replace("mlp.gate_proj", "self_attn.q_proj")
    assert torch.equal(new[attn], orig[attn])  # attention LoRA untouched
    _load_peft(tiny_base, out)
    code, _, err = cli("defend", "prune", tiny_adapter, "--base", tiny_base, "--tau", "0.25", "--out", out)
    assert code == 0 and "skip" in err


@pytest.mark.parametrize("method", ["finetune", "fine-prune", "crow"])
def test_training_defenses_change_the_adapter(cli, tiny_base, tiny_adapter, tiny_data, tmp_path, method):
    out = tmp_path / method
    code, _, err = cli("defend", method, tiny_adapter, "--base", tiny_base, "--clean", tiny_data, *FAST,
                       "--lr", "1e-3", "--out", out)
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "defend" and man["config"]["method"] == method and man["config"]["samples"] == 8
    assert man["extra"]["train"]["steps"] == 2 and man["wall_time_s"] > 0
    if method == "fine-prune":
        assert man["extra"]["selection"] == "random (adapter-only, as in the paper)"
        assert man["extra"]["channels_pruned"] == math.ceil(0.5 * 2 * 48)
    if method == "crow":
        assert man["extra"]["train"]["final_consistency_loss"] > 0 and man["extra"]["train"]["alpha"] == 5.5
    orig = load_file(str(tiny_adapter / "adapter_model.safetensors"))
    new = load_file(str(out / "adapter_model.safetensors"))
    assert orig.keys() == new.keys() and any(not torch.equal(orig[k], new[k]) for k in orig)
    _load_peft(tiny_base, out)
    assert not list(tmp_path.glob(".*pruned*"))  # fine-prune's scratch adapter is gone


def test_quantizer_groups_and_error():
    torch.manual_seed(0)
    w = torch.randn(6, 200)
    w[0, 64:128] = 0.5  # a constant group stays as it is
    q = quantize_rtn_int4(w, 64)  # groups of 64, 64, 64 and a short one of 8
    assert q.dtype == w.dtype and q.shape == w.shape
    assert max_distinct_per_group(q, 64) <= 16 < max_distinct_per_group(w, 64)
    assert torch.equal(q[0, 64:128], w[0, 64:128])
    for s in range(0, 200, 64):
        g, gq = w[:, s:s + 64], q[:, s:s + 64]
        step = ((g.amax(1) - g.amin(1)) / 15).unsqueeze(1)
        err = (gq - g).abs()
        assert (err <= step * 1.0001 + 1e-7).all()  # round to nearest: half a step, one at a clamped edge
        if g.shape[1] == 64:  # uniform rounding error averages a quarter step
            assert (err.mean(1) <= 0.35 * step.squeeze(1) + 1e-7).all()
    assert (q != w).float().mean() > 0.8
    with pytest.raises(ValueError):
        quantize_rtn_int4(torch.randn(3), 4)


def test_quantize_writes_a_really_quantized_model(cli, tiny_base, tiny_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    code, _, err = cli("defend", "quantize", tiny_adapter, "--base", tiny_base, "--group-size", "16", "--out", out)
    assert code == 0, err
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(p.suffix in (".bin", ".pt") for p in out.iterdir())
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra"]["max_distinct_per_group"] <= 16 and man["extra"]["fraction_changed"] > 0.8
    assert man["extra"]["lm_head_quantized"] is False  # tiny base ties lm_head to the embeddings
    qm = AutoModelForCausalLM.from_pretrained(str(out))
    merged = _load_peft(tiny_base, tiny_adapter).merge_and_unload()
    qs, ms = qm.state_dict(), merged.state_dict()
    n_linear = 0
    for name, mod in qm.model.layers.named_modules():
        if isinstance(mod, torch.nn.Linear):
            k = f"model.layers.{name}.weight"
            n_linear += 1
            assert max_distinct_per_group(qs[k], 16) <= 16
            assert (qs[k] != ms[k]).float().mean() > 0.5  # differs from the merged original...
            assert torch.equal(qs[k], quantize_rtn_int4(ms[k], 16))  # ...by exactly the INT4 round trip
    assert n_linear == 2 * 7
    assert torch.equal(qs["model.embed_tokens.weight"], ms["model.embed_tokens.weight"])


def test_crow_consistency_term_is_trained_down(tiny_base, tiny_adapter, tiny_data):
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_adapter, load_model, load_tokenizer
    from bdclean.io.peft_io import attach
    from bdclean.train.chat import encode
    from bdclean.lab.crow import crow_losses

    tok = load_tokenizer(tiny_base)
    model = attach(load_model(tiny_base), load_adapter(tiny_adapter))
    batch = [encode(tok, r, 48) for r in load_instructions(tiny_data)[:4]]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    cons_hist = []
    for _ in range(6):
        lm, cons = crow_losses(model, batch, tok.pad_token_id, eps=0.1)
        assert lm.requires_grad and cons.requires_grad and lm.item() > 0
        cons_hist.append(cons.item())
        opt.zero_grad()
        (lm + 5.5 * cons).backward()
        opt.step()
    assert cons_hist[0] > 0
    assert cons_hist[-1] < cons_hist[0], cons_hist
    # the FGSM perturbation matters: with ε = 0 the consistency term differs
    _, c0 = crow_losses(model, batch, tok.pad_token_id, eps=0.0)
    _, c1 = crow_losses(model, batch, tok.pad_token_id, eps=0.1)
    assert c0.item() != c1.item()


def test_compare_two_methods(cli, tiny_base, tiny_adapter, tiny_data, tmp_path):
    trig, clean, cfg = compare_inputs(tmp_path, 6, seed=1)
    out = tmp_path / "cmp"
    args = ["compare", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--triggered", trig,
            "--clean-test", clean, "--methods", "prune,quantize", "--limit", "3", "--max-new-tokens", "4",
            "--config", cfg, "--out", out]
    code, stdout, err = cli(*args)
    assert code == 0, err
    md = (out / "compare.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split("|")[1].strip() for line in table] == ["none", "prune", "quantize", "ours"]
    rec = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rec["rows"]] == ["none", "prune", "quantize", "ours"]
    assert rec["defend_options"]["tau"] == 0.25 and rec["defend_options"]["samples"] == 6
    for r in rec["rows"]:
        ev = json.loads((out / r["method"] / "eval.json").read_text())
        assert ev["triggered"]["n"] == 3 and ev["perplexity"] > 0
    assert rec["rows"][-1]["wall_time_s"] > 0 and rec["rows"][0]["wall_time_s"] == 0
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert set(json.loads(stdout)) == {"none", "prune", "quantize", "ours"}
    # rerun: every method and evaluation is reused
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".json")
              and p.parent != out and p.name != "purify.json"}  # purify rewrites its summary on every run
    code, _, err = cli(*args)
    assert code == 0, err
    assert err.count("skip eval") == 4
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_compare_rejects_unknown_methods(cli, tiny_base, tiny_adapter, tmp_path):
    f = write_rows(tmp_path / "t.jsonl", tiny_rows(2))
    code, _, err = cli("compare", tiny_adapter, "--base", tiny_base, "--triggered", f, "--clean-test", f,
                       "--methods", "prune,nope", "--out", tmp_path / "c")
    assert code == 2 and "unknown defense 'nope'" in err


def test_defend_cli_help_comes_from_defend_options():
    """The defend command's flags are generated from DefendOptions: each help is the field's description with its
    default, and an unset flag leaves the model's default (no second copy of a default to drift)."""
    import typer.main

    from bdclean.cli import app
    from bdclean.lab.defend import DefendOptions

    cmd = typer.main.get_command(app).commands["defend"]
    params = {p.name: p for p in cmd.params}
    fields = DefendOptions.model_fields
    for opt, field in {"seed": "seed", "batch_size": "batch_size", "max_len": "max_len", "alpha": "crow_alpha",
                       "eps": "crow_eps", "group_size": "group_size", "samples": "samples"}.items():
        assert params[opt].default is None, opt
        assert params[opt].help.startswith(fields[field].description), opt
        assert f"(default {fields[field].default:g})" in params[opt].help, opt
    for opt in ("tau", "lr"):  # defaults that depend on the suspicious model's kind, named in the description
        assert params[opt].default is None and fields[opt].default is None
        assert params[opt].help.startswith(fields[opt].description) and "full checkpoint" in params[opt].help