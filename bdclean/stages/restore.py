"""restore: a light fine-tune on clean samples after suppression; writes OUT/purified.

adapter-only: the suppressed adapter is fine-tuned (lr 2e-4 by default) → a PEFT adapter directory.
full-model: all weights of the suppressed checkpoint are fine-tuned (lr 1e-5 by default) → a full HF model directory.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from bdclean import constants as C
from bdclean.config import RestoreOptions
from bdclean.console import log, progress
from bdclean.io.artifacts import Manifest, atomic_dir, load_manifest, stage_fingerprint
from bdclean.stages.common import data_hash, model_hash, recorded_path, up_to_date

DEFAULT_LR = {"adapter": 2e-4, "full": 1e-5}


def _train(model, tok, clean: str, opts: RestoreOptions, lr: float, label: str, loss_fn=None) -> dict:
    from bdclean.io.data import load_instructions
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, simple_epochs, train

    pool = load_instructions(clean)
    rows = random.Random(opts.seed).sample(pool, min(opts.samples, len(pool)))
    examples = [encode(tok, r, opts.max_len) for r in rows]
    plan = simple_epochs(examples, opts.batch_size, opts.seed)
    with progress() as bar:
        task = bar.add_task(label, total=sum(len(plan(e)) for e in range(opts.epochs)))
        return train(model, plan, TrainOptions(opts.epochs, lr, opts.batch_size, opts.seed), tok.pad_token_id,
                     on_step=lambda k, tot, loss: bar.update(task, completed=k, description=f"{label} loss {loss:.3f}"),
                     loss_fn=loss_fn)


def finetune_adapter(adapter_dir: Path, base_dir: Path, clean: str, opts: RestoreOptions, label: str,
                     tensors: dict | None = None, loss_fn=None) -> tuple[dict, dict, dict]:
    """Fine-tune an adapter on ``opts.samples`` clean samples; returns (config, tensors, stats).

    ``tensors`` replaces the adapter's own weights (e.g. after pruning); ``loss_fn`` replaces the LM loss."""
    from bdclean.io.models import load_adapter, load_model, load_tokenizer
    from bdclean.io.peft_io import adapter_state, attach

    info = load_adapter(adapter_dir)
    tok = load_tokenizer(base_dir)
    model = attach(load_model(base_dir), info, tensors)
    stats = _train(model, tok, clean, opts, opts.lr or DEFAULT_LR["adapter"], label, loss_fn)
    return info.config, adapter_state(model), stats


def finetune_full(model_dir: Path, out_folder: Path, clean: str, opts: RestoreOptions, label: str) -> dict:
    """Fine-tune every weight of a full checkpoint and write it (safetensors, tokenizer copied) to ``out_folder``.

    ``model_dir`` is suppress's output, whose tokenizer files are the trusted source's (io/tokenizers.py)."""
    from bdclean.io.models import load_model, load_tokenizer, model_weight_files
    from bdclean.io.tokenizers import install

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    stats = _train(model, tok, clean, opts, opts.lr or DEFAULT_LR["full"], label)
    shards = model_weight_files(model_dir)
    max_shard = f"{max(1, max(f.stat().st_size for f in shards) // 2**20 + 1)}MB" if len(shards) > 1 else "50GB"
    with atomic_dir(out_folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard)
        # only the tokenizer files and generation config, as they are in model_dir: the generation_config.json
        # save_pretrained derived from the checkpoint's config.json (bad-words lists, forced tokens) is replaced
        # by model_dir's, or dropped
        stats = {**stats, "tokenizer_files": install(model_dir, tmp)}
    return stats


def run(out: Path, clean: str, opts: RestoreOptions, force: bool = False) -> Path:
    from bdclean.io.peft_io import write_adapter

    out = Path(out)
    sfolder = out / C.STAGE_DIRS["suppress"]
    sup_fp = stage_fingerprint(sfolder, "suppress")
    pman = load_manifest(out / C.STAGE_DIRS["train-pairs"]) or {}
    mode = pman.get("config", {}).get("mode", "adapter")
    base_dir = Path(recorded_path(pman, "base") or "")
    folder = out / C.STAGE_DIRS["restore"]
    lr = opts.lr or DEFAULT_LR[mode]
    inputs = {"suppressed": sup_fp, "clean": data_hash(clean)}
    if mode == "adapter":
        inputs["base"] = model_hash(base_dir)
    man = Manifest("restore", {**opts.model_dump(), "lr": lr, "clean": str(clean), "mode": mode}, inputs)
    if up_to_date(folder, man.fingerprint, "restore", force):
        return folder
    if mode == "full":
        man.extra = finetune_full(sfolder, folder, clean, opts, "restore (full model)")
        outputs = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != C.MANIFEST)
    else:
        cfg, tensors, stats = finetune_adapter(sfolder, base_dir, clean, opts, "restore")
        write_adapter(folder, cfg, tensors)
        man.extra = stats
        outputs = [C.ADAPTER_CONFIG, C.ADAPTER_WEIGHTS]
    man.write(folder, outputs)
    log(f"restore: purified {'model' if mode == 'full' else 'adapter'} → {folder}")
    return folder
