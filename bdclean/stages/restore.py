"""restore: a light fine-tune of the suppressed adapter on clean samples; writes the purified adapter."""

from __future__ import annotations

import random
from pathlib import Path

from bdclean import constants as C
from bdclean.config import RestoreOptions
from bdclean.console import log, progress
from bdclean.io.artifacts import Manifest, load_manifest, stage_fingerprint
from bdclean.stages.common import data_hash, model_hash, up_to_date


def finetune_adapter(adapter_dir: Path, base_dir: Path, clean: str, opts: RestoreOptions, label: str) -> tuple[dict, dict, dict]:
    """Fine-tune an adapter on ``opts.samples`` clean samples; returns (config, tensors, stats)."""
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_adapter, load_model, load_tokenizer
    from bdclean.io.peft_io import adapter_state, attach
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, simple_epochs, train

    info = load_adapter(adapter_dir)
    pool = load_instructions(clean)
    rows = random.Random(opts.seed).sample(pool, min(opts.samples, len(pool)))
    tok = load_tokenizer(base_dir)
    model = attach(load_model(base_dir), info)
    examples = [encode(tok, r, opts.max_len) for r in rows]
    plan = simple_epochs(examples, opts.batch_size, opts.seed)
    with progress() as bar:
        task = bar.add_task(label, total=sum(len(plan(e)) for e in range(opts.epochs)))
        stats = train(model, plan, TrainOptions(opts.epochs, opts.lr, opts.batch_size, opts.seed), tok.pad_token_id,
                      on_step=lambda k, tot, loss: bar.update(task, completed=k, description=f"{label} loss {loss:.3f}"))
    return info.config, adapter_state(model), stats


def run(out: Path, clean: str, opts: RestoreOptions, force: bool = False) -> Path:
    from bdclean.io.peft_io import write_adapter

    out = Path(out)
    sfolder = out / C.STAGE_DIRS["suppress"]
    pman = load_manifest(out / C.STAGE_DIRS["train-pairs"]) or {}
    base_dir = Path(pman.get("config", {}).get("base", ""))
    folder = out / C.STAGE_DIRS["restore"]
    man = Manifest("restore", {**opts.model_dump(), "clean": str(clean)},
                   {"suppressed": stage_fingerprint(sfolder, "suppress"), "clean": data_hash(clean),
                    "base": model_hash(base_dir)})
    if up_to_date(folder, man.fingerprint, "restore", force):
        return folder
    cfg, tensors, stats = finetune_adapter(sfolder, base_dir, clean, opts, "restore")
    write_adapter(folder, cfg, tensors)
    man.extra = stats
    man.write(folder, [C.ADAPTER_CONFIG, C.ADAPTER_WEIGHTS])
    log(f"restore: purified adapter → {folder}")
    return folder
