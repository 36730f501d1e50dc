"""merge: the purified adapter folded into its base → a full checkpoint (`purify --merge`).

A user who brought a full checkpoint (the known-base route: `purify CKPT --extract RANK`) wants a checkpoint back,
not an adapter. The merged model is written in the base's own dtype, sharded like the base, with the base's
tokenizer files, chat template and generation config (the defender's, never the suspicious checkpoint's: SECURITY.md
guarantee 2). Nothing is trained; the output loads with `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.console import log
from bdclean.errors import UsageError
from bdclean.io.artifacts import Manifest, atomic_dir, stage_fingerprint
from bdclean.io.fingerprints import model_hash
from bdclean.pipeline.card import merged_card
from bdclean.pipeline.folders import up_to_date
from bdclean.pipeline.run import Run


def run(run: Run, force: bool = False) -> Path:
    import torch

    from bdclean.io.models import load_adapter, load_model, read_model_config, shard_size_like
    from bdclean.io.peft_io import attach
    from bdclean.io.tokenizers import install

    pfolder, folder = run.folder("restore"), run.folder("merge")
    if run.mode != "adapter":
        raise UsageError("--merge folds a purified adapter into its base; full-model mode writes a checkpoint already")
    base_dir = run.base_dir
    man = Manifest("merge", {}, {"purified": stage_fingerprint(pfolder, "restore"), "base": model_hash(base_dir)})
    if up_to_date(folder, man.fingerprint, "merge", force):
        return folder
    base_cfg = read_model_config(base_dir)
    dtype = base_cfg.get("torch_dtype") or base_cfg.get("dtype") or "float32"
    dtype = dtype if dtype in ("float32", "float16", "bfloat16") else "float32"
    model = attach(load_model(base_dir), load_adapter(pfolder, base_cfg, base_dir)).merge_and_unload()
    model = model.to(getattr(torch, dtype))
    max_shard = shard_size_like(base_dir)
    with atomic_dir(folder, "merge") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard)
        man.extra = {"dtype": dtype, "tokenizer_files": install(base_dir, tmp), "base": str(base_dir)}
        (tmp / C.MODEL_CARD).write_text(merged_card(run.out))  # bdclean's own card, never the base's or the checkpoint's
    man.write(folder, sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != C.MANIFEST))
    log(f"merge: purified adapter merged into {base_dir} ({dtype}) → {folder}")
    return folder
