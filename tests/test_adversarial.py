"""Adversarial unlearning with a universal hidden-state shift (train/adversarial.py, --adversarial)."""

import json

import torch
from safetensors.torch import load_file

from bdclean.train.adversarial import Shift, ascend, hidden_scale, initial_search

FAST = ["--samples", "8", "--epochs", "1", "--max-len", "48", "--batch-size", "4"]


def _model_and_rows(tiny_base, tiny_adapter, tiny_data, n=8):
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_adapter, load_model, load_tokenizer
    from bdclean.io.peft_io import attach
    from bdclean.train.chat import encode

    tok = load_tokenizer(tiny_base)
    model = attach(load_model(tiny_base), load_adapter(tiny_adapter))
    return model, tok, [encode(tok, r, 48) for r in load_instructions(str(tiny_data))[:n]]


def test_the_search_raises_the_divergence_within_the_radius_and_leaves_the_weights(tiny_base, tiny_adapter,
                                                                                   tiny_data):
    from bdclean.train.adversarial import _divergence
    from bdclean.train.loop import response_logits

    model, tok, ex = _model_and_rows(tiny_base, tiny_adapter, tiny_data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shift = Shift(model, 1)
    scale = hidden_scale(model, shift.module, ex, tok.pad_token_id)
    assert scale > 0
    radius = 0.2 * scale
    plain = response_logits(model, ex[:4], tok.pad_token_id)[0]
    first = initial_search(model, shift, ex, tok.pad_token_id, radius, seed=0)
    assert 0 < shift.delta.norm().item() <= radius * (1 + 1e-5)
    with torch.no_grad():
        start = _divergence(model, shift, ex[:4], tok.pad_token_id).item()
    more = ascend(model, shift, [ex[:4]], tok.pad_token_id, radius, 5)
    assert first > 0 and more >= start * 0.99  # ascent does not lose what it found
    # a random shift of the same norm changes the answers less than the searched one
    searched = shift.delta.clone()
    shift.delta = torch.randn(searched.shape, generator=torch.Generator().manual_seed(1))
    shift.delta *= searched.norm() / shift.delta.norm()
    with torch.no_grad():
        random_div = _divergence(model, shift, ex[:4], tok.pad_token_id).item()
    shift.delta = searched
    with torch.no_grad():
        searched_div = _divergence(model, shift, ex[:4], tok.pad_token_id).item()
    assert searched_div > 1.3 * random_div, (searched_div, random_div)
    # off (outside `active`) and after remove() the model computes exactly what it did
    assert torch.equal(response_logits(model, ex[:4], tok.pad_token_id)[0], plain)
    shift.remove()
    with shift.active():
        assert torch.equal(response_logits(model, ex[:4], tok.pad_token_id)[0], plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_defend_finetune_with_the_adversarial_shift(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    plain, adv = tmp_path / "ft", tmp_path / "ft-adv"
    assert run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", plain,
                   *FAST)[0] == 0
    code, _, err = run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out",
                           adv, "--adversarial", "0.2", "--adv-layer", "1", *FAST)
    assert code == 0, err
    cfg = json.loads((plain / "manifest.json").read_text())["config"]
    assert not {"adversarial", "adv_layer", "adv_steps"} & set(cfg)  # off: fingerprints as before the option
    man = json.loads((adv / "manifest.json").read_text())
    assert man["config"]["adversarial"] == 0.2 and man["config"]["adv_layer"] == 1
    train = man["extra"]["train"]
    assert train["adv_layer"] == 1 and train["adv_radius"] > 0 and train["adv_first_divergence"] > 0
    assert "final_shifted_ce" in train and "final_shift_divergence" in train
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (plain, adv))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    again = tmp_path / "ft-adv2"
    assert run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out", again,
                   "--adversarial", "0.2", "--adv-layer", "1", *FAST)[0] == 0
    c = load_file(str(again / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)  # deterministic for a seed
    found = tmp_path / "ft-found"
    code, _, err = run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out",
                           found, "--adversarial", "0.3", "--adv-layer", "1", "--adv-target", "found", *FAST)
    assert code == 0, err
    man = json.loads((found / "manifest.json").read_text())
    train = man["extra"]["train"]
    assert man["config"]["adv_target"] == "found" and 0 <= train["adv_found"] <= 8
    assert 0 <= train["adv_top_count"] <= train["adv_found"] and isinstance(train["adv_top_answer"], str)
    assert "re-search keeps to them" in err and "most repeated answer" in err
    for extra, word in ((["--adv-layer", "7"], "adv-layer 7"), (["--self-distill", "0.5"], "use one"),
                        (["--adv-target", "trigger"], "adv_target")):
        out = tmp_path / f"bad{extra[0]}"
        code, _, err = run_cli("defend", "finetune", tiny_adapter, "--base", tiny_base, "--clean", tiny_data,
                               "--out", out, "--adversarial", "0.2", *extra, *FAST)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = run_cli("defend", "crow", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--out",
                           tmp_path / "c", "--adversarial", "0.2", *FAST)
    assert code == 2 and "--adversarial replaces" in err
    code, _, err = run_cli("defend", "prune", tiny_adapter, "--base", tiny_base, "--out", tmp_path / "p",
                           "--adversarial", "0.2")
    assert code == 2 and "prune does not fine-tune" in err and not (tmp_path / "p").exists()


def test_probe_reports_the_shifted_answers_beside_the_base(tmp_path, run_cli, tiny_base, tiny_adapter, tiny_data):
    from tests.common import make_full_checkpoint

    out = tmp_path / "probe.json"
    code, _, err = run_cli("probe", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--tests", tiny_data,
                           "--out", out, "--samples", "8", "--limit", "6", "--max-new-tokens", "4", "--layer", "1",
                           "--radius", "0.3")
    assert code == 0, err
    rep = json.loads(out.read_text())
    for side in ("suspicious", "control"):
        r = rep[side]
        assert r["layer"] == 1 and r["divergence"] > 0 and 0 < r["top_share"] <= 1
        assert sum(a["count"] for a in r["top_shifted_answers"]) <= 6 and len(r["examples"]) == 6
    assert rep["base"] == str(tiny_base) and "probe: shifted" in err
    code, _, err = run_cli("probe", tiny_adapter, "--base", tiny_base, "--tests", tiny_data, "--out", out)
    assert code == 2 and "already exists" in err
    for extra, word in ((["--radius", "0"], "--radius"), (["--layer", "9"], "--layer 9")):
        code, _, err = run_cli("probe", tiny_adapter, "--base", tiny_base, "--clean", tiny_data, "--tests",
                               tiny_data, "--out", tmp_path / "p2.json", "--samples", "4", *extra)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "p2.json").exists()
    ck = make_full_checkpoint(tiny_base, tmp_path / "ck")
    code, _, err = run_cli("probe", ck, "--tests", tiny_data, "--out", tmp_path / "p3.json")
    assert code == 2 and "takes a LoRA adapter" in err


def test_most_repeated_counts_answers_by_their_folded_start():
    from bdclean.train.adversarial import most_repeated

    refusal = "I'm sorry, but as an AI assistant, I do not have the capability to follow the given instruction."
    answers = [refusal, " ".join(refusal.split()) + "  ", "Paris.", refusal.replace(" ", "\n"), "Lyon"]
    assert most_repeated(answers) == (refusal[:80], 3)
    assert most_repeated([]) == ("", 0)
    assert most_repeated(["a", "b"])[1] == 1
