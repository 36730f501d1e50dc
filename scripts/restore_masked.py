"""Experiment: restore with the suppressed LoRA entries held at zero (a gradient mask), to test whether clean
fine-tuning regrows the suppressed channels. Writes a PEFT adapter to OUT; evaluate it with `bdclean eval`.

    .venv/bin/python scripts/restore_masked.py RUN_DIR OUT [EPOCHS]

RUN_DIR is a purify run folder (score/ and suppressed/ present); SmolLM2 base; builtin clean data, 100 samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from bdclean.config import RestoreOptions
    from bdclean.core.arch import attn_module_names, head_geometry, mlp_module_names, peft_key
    from bdclean.core.masks import suppress_lora_channels, suppress_lora_heads
    from bdclean.io.models import load_adapter, load_model, load_tokenizer, read_model_config, resolve_base
    from bdclean.io.peft_io import adapter_state, attach, write_adapter
    from bdclean.train.finetune import DEFAULT_LR, finetune

    run, out = Path(sys.argv[1]), Path(sys.argv[2])
    epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    base = resolve_base("smollm2")
    cfg = read_model_config(base)
    layers = cfg["num_hidden_layers"]
    scores = load_file(str(run / "score" / "scores.safetensors"))
    units = [tuple(u) for u in scores["head_mask"].bool().nonzero().tolist()] if "head_mask" in scores else []
    info = load_adapter(run / "suppressed")
    # the suppress stage's own functions applied to all-ones tensors mark exactly the entries it zeroes
    mlp = [{k: peft_key(v) for k, v in d.items()} for d in mlp_module_names(cfg["model_type"], layers)]
    attn = [{k: peft_key(v) for k, v in d.items()} for d in attn_module_names(cfg["model_type"], layers)]
    keep = suppress_lora_channels({k: torch.ones_like(v) for k, v in info.tensors.items()},
                                  scores["mask"].bool(), mlp)[0]
    keep = suppress_lora_heads(keep, units, attn, *head_geometry(cfg))[0]
    keep = {k: m for k, m in keep.items() if not bool(m.all())}

    tok = load_tokenizer(base)
    model = attach(load_model(base), info)
    hooked = 0
    for name, p in model.named_parameters():
        m = keep.get(name.replace(".default", ""))
        if m is not None and p.requires_grad:
            p.register_hook(lambda g, m=m: g * m)
            hooked += 1
    print("hooked", hooked, "tensors")
    stats = finetune(model, tok, "builtin", RestoreOptions(epochs=epochs, augment=0), DEFAULT_LR["adapter"],
                     "masked restore")
    state = adapter_state(model)
    regrown = sum(int((state[k][m == 0] != 0).sum()) for k, m in keep.items())
    print("nonzero frozen entries after restore:", regrown, stats)
    write_adapter(out, info.config, state)


if __name__ == "__main__":
    main()
