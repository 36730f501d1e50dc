"""Experiment: restore with the suppressed LoRA entries held at zero (a gradient mask), to test whether clean
fine-tuning regrows the suppressed channels. Writes a PEFT adapter to OUT; evaluate it with `bdclean eval`.

    .venv/bin/python scripts/restore_masked.py RUN_DIR OUT [EPOCHS]

RUN_DIR is a purify run folder (score/ and suppressed/ present); SmolLM2 base; builtin clean data, 100 samples.
"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from safetensors.torch import load_file
from bdclean.config import RestoreOptions
from bdclean.core.arch import mlp_module_names, attn_module_names, head_geometry, peft_key
from bdclean.core.channels import head_slices
from bdclean.io.models import load_adapter, load_model, load_tokenizer, resolve_base, read_model_config
from bdclean.io.peft_io import attach, adapter_state, write_adapter
from bdclean.stages import restore as R

run = Path(sys.argv[1]); out = Path(sys.argv[2]); epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
base = resolve_base("smollm2"); cfg = read_model_config(base); L = cfg["num_hidden_layers"]
sc = load_file(str(run / "score/scores.safetensors")); mask = sc["mask"].bool()
units = [tuple(u) for u in sc["head_mask"].bool().nonzero().tolist()] if "head_mask" in sc else []
frozen = {}  # adapter key -> (dim, index tensor)
for layer, names in enumerate(mlp_module_names(cfg["model_type"], L)):
    idx = mask[layer].nonzero().flatten()
    frozen[peft_key(names["gate"]) + ".lora_B.weight"] = (0, idx)
    frozen[peft_key(names["up"]) + ".lora_B.weight"] = (0, idx)
    frozen[peft_key(names["down"]) + ".lora_A.weight"] = (1, idx)
nq, nkv, hd = head_geometry(cfg); attn = attn_module_names(cfg["model_type"], L)
for layer, g in units:
    sl = head_slices(g, nq, nkv, hd)
    for part in "qkvo":
        key = peft_key(attn[layer][part]) + (".lora_A.weight" if part == "o" else ".lora_B.weight")
        d, prev = frozen.get(key, (1 if part == "o" else 0, torch.empty(0, dtype=torch.long)))
        frozen[key] = (d, torch.cat([prev, torch.arange(sl[part].start, sl[part].stop)]))
info = load_adapter(run / "suppressed"); tok = load_tokenizer(base)
model = attach(load_model(base), info)
n = 0
for name, p in model.named_parameters():
    key = name.replace(".default", "")
    if key in frozen and p.requires_grad:
        d, idx = frozen[key]
        m = torch.ones_like(p); (m.index_fill_(d, idx, 0.0))
        p.register_hook(lambda g, m=m: g * m); n += 1
print("hooked", n, "tensors")
opts = RestoreOptions(epochs=epochs)
stats = R._train(model, tok, "builtin", opts, 2e-4, "masked restore")
st = adapter_state(model)
z = sum(int((st[k].index_select(d, i) != 0).sum()) for k, (d, i) in frozen.items() if k in st and i.numel())
print("nonzero frozen entries after restore:", z, stats)
write_adapter(out, info.config, st)
