"""Baseline defenses on a full checkpoint (lab/defend_full.py), on a tiny Llama checkpoint."""

import json
import math

import pytest
import torch

from tests.common import load_weights, make_full_checkpoint, make_tiny_llama

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_base):
    """A 'fine-tuned' full checkpoint of tiny_base in 3 shards, with a hostile chat template (tests/common.py)."""
    return make_full_checkpoint(tiny_base, tmp_path_factory.mktemp("ck") / "checkpoint")


_weights = load_weights


def test_core_zero_channels_and_wanda_scores():
    from bdclean.core.masks import zero_channels
    from bdclean.core.score import wanda_channel_scores

    w = torch.arange(12.0).view(3, 4) + 1
    idx = torch.tensor([1, 3])
    rows, cols = zero_channels(w, torch.tensor([0, 2]), "up"), zero_channels(w, idx, "down")
    assert rows[[0, 2]].abs().sum() == 0 and torch.equal(rows[1], w[1])
    assert cols[:, idx].abs().sum() == 0 and torch.equal(cols[:, [0, 2]], w[:, [0, 2]]) and w.min() > 0
    with pytest.raises(ValueError):
        zero_channels(w, idx, "q")
    down = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5]])  # [hidden 2, channels 3]
    act_sq = torch.tensor([4.0, 0.0, 9.0])
    got = wanda_channel_scores(down, act_sq)
    assert torch.allclose(got, torch.tensor([4.0 * 2, 3.0 * 0, 1.0 * 3], dtype=torch.float64))


def test_prune_zeroes_exactly_the_smallest_weight_channels_and_keeps_the_rest(run_cli, checkpoint, tiny_base, tmp_path):
    out = tmp_path / "prune"
    code, _, err = run_cli("defend", "prune", checkpoint, "--out", out, "--tokenizer", tiny_base,
                           "--accept-tokenizer", "--tau", "0.25")
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    cfg = json.loads((checkpoint / "config.json").read_text())
    L, I = cfg["num_hidden_layers"], cfg["intermediate_size"]
    assert man["config"]["mode"] == "full" and man["extra"]["channels_pruned"] == math.ceil(0.25 * L * I)
    assert "chat_template.jinja" in " ".join(man["config"]["accepted_tokenizer_differences"])
    before, after = _weights(checkpoint), _weights(out)
    assert before.keys() == after.keys()
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    norms = torch.stack([((before[f"model.layers.{l}.mlp.gate_proj.weight"] ** 2).sum(1)
                          + (before[f"model.layers.{l}.mlp.up_proj.weight"] ** 2).sum(1)
                          + (before[f"model.layers.{l}.mlp.down_proj.weight"] ** 2).sum(0)).sqrt() for l in range(L)])
    pruned = torch.stack([after[f"model.layers.{l}.mlp.gate_proj.weight"].abs().sum(1) == 0 for l in range(L)])
    assert int(pruned.sum()) == man["extra"]["channels_pruned"]
    assert norms[pruned].max() <= norms[~pruned].min()  # the smallest channels went, globally
    for key, b in before.items():
        a = after[key]
        if ".mlp." not in key:
            assert torch.equal(a, b), key  # outside the pruned channels: bit-identical
            continue
        keep = ~pruned[int(key.split("layers.")[1].split(".")[0])]
        if "down_proj" in key:
            assert torch.equal(a[:, keep], b[:, keep]) and a[:, ~keep].abs().sum() == 0
        else:
            assert torch.equal(a[keep], b[keep]) and a[~keep].abs().sum() == 0
    # the trusted tokenizer's files, never the checkpoint's hostile template
    assert not (out / "chat_template.jinja").exists() or \
        (out / "chat_template.jinja").read_text() == (tiny_base / "chat_template.jinja").read_text()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_base / name).read_bytes()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))  # loads as a plain HF checkpoint
    code, _, err = run_cli("defend", "prune", checkpoint, "--out", out, "--tokenizer", tiny_base,
                           "--accept-tokenizer", "--tau", "0.25")
    assert code == 0 and "up to date" in err


def test_wanda_picks_channels_dormant_on_clean_inputs_not_small_ones(tiny_base, tiny_data, tmp_path):
    """A channel whose up row is zero never fires (activation 0) however large its down column: Wanda selects it,
    magnitude pruning does not; a channel with a tiny down column is selected by both."""
    from transformers import AutoModelForCausalLM

    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_tokenizer
    from bdclean.lab.defend_full import (
        down_input_energy,
        wanda_mask,
        weight_channel_norms,
    )

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    cfg = model.config.to_dict()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5].zero_()
        mlp.down_proj.weight[:, 5] *= 50
        mlp.down_proj.weight[:, 9] *= 1e-4
    tok = load_tokenizer(tiny_base)
    rows = load_instructions(str(tiny_data))[:6]
    energy = down_input_energy(model, tok, rows, cfg, 48, 4)
    assert energy[0, 5] == 0 and (energy[0, torch.arange(48) != 5] > 0).all()
    mask, scores = wanda_mask(model, tok, rows, cfg, 2 / 48, 48, 4)
    assert mask[0, 5] and mask[0, 9] and int(mask[0].sum()) == 2 and int(mask[1].sum()) == 2  # per layer
    norms = weight_channel_norms(model, cfg)
    assert norms[0, 5] > norms[0].median()  # a magnitude cut would keep it
    # the energy is that of the real tokens only: padding more does not change it
    again = down_input_energy(model, tok, rows, cfg, 48, 6)
    assert torch.allclose(energy, again, rtol=1e-6)


def test_fine_prune_and_crow_train_every_weight_and_are_deterministic(run_cli, checkpoint, tiny_base, tiny_data,
                                                                      tmp_path):
    args = ["--tokenizer", tiny_base, "--accept-tokenizer", "--clean", tiny_data, *FAST, "--lr", "1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        code, _, err = run_cli("defend", "fine-prune", checkpoint, "--out", out, *args)
        assert code == 0, err
    man = json.loads((a / "manifest.json").read_text())
    assert man["extra"]["selection"].startswith("per layer, smallest structured Wanda")
    assert man["config"]["tau"] == 0.05 and man["config"]["lr"] == 1e-3  # the full-model signature's τ by default
    wa, wb, before = _weights(a), _weights(b), _weights(checkpoint)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    pruned = wa["model.layers.0.mlp.gate_proj.weight"].abs().sum(1) == 0
    # pruned channels stay pruned through the fine-tune: no gradient reaches a channel with zero gate, up and down
    assert int(pruned.sum()) == math.ceil(0.05 * 48) and wa["model.layers.0.mlp.down_proj.weight"][:, pruned].abs().sum() == 0
    code, _, err = run_cli("defend", "crow", checkpoint, "--out", tmp_path / "crow", *args)
    assert code == 0, err
    man = json.loads((tmp_path / "crow" / "manifest.json").read_text())
    assert man["extra"]["train"]["alpha"] == 5.5 and "consistency_loss" in json.dumps(man["extra"]["train"])


def test_quantize_a_full_checkpoint(run_cli, checkpoint, tiny_base, tmp_path):
    from bdclean.lab.quant import max_distinct_per_group

    out = tmp_path / "q"
    code, _, err = run_cli("defend", "quantize", checkpoint, "--out", out, "--tokenizer", tiny_base,
                           "--accept-tokenizer", "--group-size", "16")
    assert code == 0, err
    w = _weights(out)
    q = w["model.layers.1.mlp.down_proj.weight"]
    assert max_distinct_per_group(q, 16) <= 16
    assert not torch.equal(q, _weights(checkpoint)["model.layers.1.mlp.down_proj.weight"])


def test_reset_needs_the_base_and_starts_from_it(run_cli, checkpoint, tiny_base, tiny_data, tmp_path):
    args = ["--tokenizer", tiny_base, "--accept-tokenizer", "--clean", tiny_data, *FAST]
    code, _, err = run_cli("defend", "reset", checkpoint, "--out", tmp_path / "r0", *args)
    assert code == 2 and "needs --base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r0").exists()
    code, _, err = run_cli("defend", "retrain", checkpoint, "--out", tmp_path / "r1", *args)
    assert code == 2 and "reset --base" in err
    code, _, err = run_cli("defend", "finetune", checkpoint, "--out", tmp_path / "r1", "--base", tiny_base, *args)
    assert code == 2 and "only reset uses" in err and not (tmp_path / "r1").exists()
    other = make_tiny_llama(tmp_path / "other", inter=64)
    code, _, err = run_cli("defend", "reset", checkpoint, "--out", tmp_path / "r2", "--base", other, *args)
    assert code == 2 and "intermediate_size" in err
    out = tmp_path / "r"
    code, _, err = run_cli("defend", "reset", checkpoint, "--out", out, "--base", tiny_base, *args, "--lr", "1e-9")
    assert code == 0, err
    after, base, ck = _weights(out), _weights(tiny_base), _weights(checkpoint)
    key = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(after[key], base[key], atol=1e-6) and not torch.allclose(after[key], ck[key], atol=1e-2)
    man = json.loads((out / "manifest.json").read_text())
    assert man["inputs"]["base"] and man["extra"]["kept_update_share_before_restore"] == {"all": 0.0}


def test_full_checkpoint_needs_a_trusted_tokenizer_and_adapters_refuse_one(run_cli, checkpoint, tiny_base,
                                                                           tiny_adapter, tmp_path):
    code, _, err = run_cli("defend", "prune", checkpoint, "--out", tmp_path / "p")
    assert code == 2 and "--tokenizer" in err and not (tmp_path / "p").exists()
    code, _, err = run_cli("defend", "prune", checkpoint, "--out", tmp_path / "p", "--tokenizer", tiny_base)
    assert code == 2 and "--accept-tokenizer" in err and not (tmp_path / "p").exists()
    code, _, err = run_cli("defend", "prune", tiny_adapter, "--base", tiny_base, "--out", tmp_path / "a",
                           "--tokenizer", tiny_base)
    assert code == 2 and "full checkpoints" in err


def test_finetune_with_prompts_distils_the_checkpoints_answers(run_cli, checkpoint, tiny_base, tiny_data, tmp_path):
    out = tmp_path / "ft"
    code, _, err = run_cli("defend", "finetune", checkpoint, "--out", out, "--tokenizer", tiny_base,
                           "--accept-tokenizer", "--clean", tiny_data, "--prompts", tiny_data, *FAST)
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["extra"]["distill"]["prompts_drawn"] > 0 and man["inputs"]["prompts"]
    assert man["config"]["lr"] == 1e-5  # the full-model lr by default
    rows = [json.loads(x) for x in (out / "distill_targets.jsonl").read_text().splitlines()]
    assert len(rows) == man["extra"]["distill"]["prompts_drawn"] - man["extra"]["distill"]["empty_answers"]


def test_reset_with_self_distill_learns_from_the_checkpoint(run_cli, checkpoint, tiny_base, tiny_data, tmp_path):
    """reset --base --self-distill 1: the base's weights, then a fine-tune on the checkpoint's own distributions:
    the loss it reports is the KL to the checkpoint and it falls."""
    out = tmp_path / "r"
    code, _, err = run_cli("defend", "reset", checkpoint, "--out", out, "--base", tiny_base, "--tokenizer", tiny_base,
                           "--accept-tokenizer", "--clean", tiny_data, *FAST, "--epochs", "3", "--lr", "1e-3",
                           "--self-distill", "1")
    assert code == 0, err
    train = json.loads((out / "manifest.json").read_text())["extra"]["train"]
    assert train["final_kl"] < train["first_kl"] and train["final_loss"] == pytest.approx(train["final_kl"], rel=1e-4)
