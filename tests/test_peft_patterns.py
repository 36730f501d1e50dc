"""bdclean reads an adapter's rank and scaling per module as PEFT builds them: rank_pattern, alpha_pattern (regular
expressions matched against the module name's end, `|` alternatives included) and rslora."""

from __future__ import annotations

import pytest

CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 2, r"layers\.1\.self_attn\.(q|v)_proj": 6},
                     alpha_pattern={"gate_proj|up_proj": 3, "model.layers.0.self_attn.o_proj": 12}),
    "patterns+rslora": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj|o_proj": 2},
                            alpha_pattern={r"layers\.0\..*": 5}),
    # PEFT matches against the base model's module name, so a pattern may anchor at its start
    "anchored": dict(r=4, lora_alpha=8, rank_pattern={r"^model\.layers\.0\.mlp\.down_proj": 2},
                     alpha_pattern={r"^model\.layers\.1\..*": 2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rank_and_scaling_match_peft(name, tiny_base, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from bdclean.io.models import load_adapter

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)), LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM", **CASES[name]))
    pm.save_pretrained(str(tmp_path / "a"), safe_serialization=True)
    peft_built = {n: (m.r["default"], m.scaling["default"]) for n, m in pm.named_modules() if isinstance(m, LoraLayer)}

    info = load_adapter(tmp_path / "a")
    ours = {}
    for mod in info.module_pairs():
        key = mod.replace(".default", "")
        r = info.rank(key)
        ours[key] = (r, info.scaling(key, r))
    assert len(ours) == len(peft_built) == 14
    for n, (r, s) in peft_built.items():
        assert ours[n][0] == r, (n, ours[n], r)
        assert ours[n][1] == pytest.approx(s), (n, ours[n], s)
    if name == "patterns":  # the patterns really gave different values
        assert {v for v in peft_built.values()} >= {(2, 4.0), (6, 8 / 6), (4, 0.75), (4, 3.0)}
