"""restore: a light fine-tune on clean samples after suppression; writes OUT/purified.

adapter-only: the suppressed adapter is fine-tuned (lr 2e-4 by default) → a PEFT adapter directory.
full-model: all weights of the suppressed checkpoint are fine-tuned (lr 1e-5 by default) → a full HF model directory.
"""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.config import RESTORE_OFF_FIELDS, RestoreOptions
from bdclean.console import log, progress
from bdclean.io.artifacts import Manifest, atomic_dir, stage_fingerprint, write_text
from bdclean.io.fingerprints import data_hash, model_hash
from bdclean.pipeline.card import model_card
from bdclean.pipeline.folders import up_to_date
from bdclean.pipeline.run import Run
from bdclean.train.finetune import DEFAULT_LR, finetune, finetune_adapter, with_defaults

DISTILL_FILE = "distill_targets.jsonl"  # --prompts: the suspicious model's answers the restore trained on


def load_teacher(teacher: Path, base: str | None, tokenizer_dir: Path | None = None):
    """(model, tokenizer) of the suspicious model for inference: an adapter on ``base`` (merged: the same function
    without the LoRA side-path, faster), or with ``tokenizer_dir`` a full checkpoint's weights and the trusted
    tokenizer (the checkpoint's own tokenizer files are never parsed)."""
    if tokenizer_dir is None:
        from bdclean.pipeline.run import load_any

        model, tok, _ = load_any(teacher, base or "smollm2")
        return model, tok
    from bdclean.io.models import load_tokenizer
    from bdclean.train.device import load_placed

    return load_placed(teacher), load_tokenizer(tokenizer_dir)


def distill_targets(teacher: Path, base: str | None, prompts: str, opts: RestoreOptions,
                    tokenizer_dir: Path | None = None) -> tuple[list[dict], dict]:
    """The suspicious model's own greedy answers to ``opts.prompt_samples`` task prompts (seeded draw).

    On trigger-free inputs the suspicious model is a clean reference of its own skill, so these rows teach the
    restore what the adapter was for. Prompts that already carry the (unknown) trigger would teach the backdoor
    back: use inputs you trust to be trigger-free, and check triggered ASR after restore. ``tokenizer_dir``: where the
    prompts' tokenizer and chat template come from (a full checkpoint's own template is attacker-controlled and
    could insert the trigger into every prompt; restore passes the trusted one that suppress wrote)."""
    from bdclean.io.data import sample_prompts
    from bdclean.train.generate import generate

    rows, total = sample_prompts(prompts, opts.prompt_samples, opts.seed)
    model, tok = load_teacher(teacher, base, tokenizer_dir)
    with progress() as bar:
        tid = bar.add_task("restore: answering task prompts", total=len(rows))
        outs = generate(model, tok, rows, opts.distill_tokens, on_batch=lambda k: bar.update(tid, advance=k))
    targets = [{**r, "output": o} for r, o in zip(rows, outs) if o.strip()]
    del model
    return targets, {"prompts_in_file": total, "prompts_drawn": len(rows), "empty_answers": len(rows) - len(targets)}


def finetune_full(model_dir: Path, out_folder: Path, clean: str, opts: RestoreOptions, label: str,
                  extra_rows: list[dict] | None = None, teacher=None) -> dict:
    """Fine-tune every weight of a full checkpoint and write it (safetensors, tokenizer copied) to ``out_folder``.

    ``model_dir`` is suppress's output, whose tokenizer files are the trusted source's (io/tokenizers.py)."""
    from bdclean.io.models import load_tokenizer, shard_size_like
    from bdclean.io.tokenizers import install
    from bdclean.train.device import load_placed

    tok = load_tokenizer(model_dir)
    model = load_placed(model_dir)  # in bfloat16, the weights themselves train in bf16 (train/device.py)
    for p in model.parameters():
        p.requires_grad_(True)
    stats = finetune(model, tok, clean, opts, opts.lr or DEFAULT_LR["full"], label, extra_rows=extra_rows,
                     teacher=teacher)
    max_shard = shard_size_like(model_dir)
    with atomic_dir(out_folder, "restore") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard)
        # only the tokenizer files and generation config, as they are in model_dir: the generation_config.json
        # save_pretrained derived from the checkpoint's config.json (bad-words lists, forced tokens) is replaced
        # by model_dir's, or dropped
        stats = {**stats, "tokenizer_files": install(model_dir, tmp)}
    return stats


def input_dtypes(tensors: dict, source: Path) -> dict:
    """``tensors`` (trained in float32) cast back to the dtypes ``source`` stores them in (suppress keeps the
    suspicious adapter's): a float16 or bfloat16 adapter comes out as it came in, and the log says so."""
    import torch

    from bdclean.io.headers import DTYPE_NAMES, read_header

    stored = read_header(source)
    kept = {DTYPE_NAMES[dt] for k, (dt, _) in stored.items() if k in tensors and dt != "F32"}
    if not kept:
        return tensors
    log(f"restore: the adapter stores {', '.join(sorted(kept))} tensors; trained in float32, written back as "
        f"{', '.join(sorted(kept))}")
    return {k: t.to(getattr(torch, DTYPE_NAMES[stored[k][0]])) if k in stored else t for k, t in tensors.items()}


def run(run: Run, clean: str, opts: RestoreOptions, force: bool = False, prompts: str | None = None) -> Path:
    from bdclean.io.artifacts import write_jsonl
    from bdclean.io.peft_io import write_adapter
    from bdclean.train import device as dev

    sfolder, folder = run.folder("suppress"), run.folder("restore")
    sup_fp = stage_fingerprint(sfolder, "suppress")
    mode, base_dir = run.mode, run.base_dir
    opts = with_defaults(opts, mode)  # lr and augment per kind, recorded in the fingerprint as run
    lr = opts.lr
    inputs = {"suppressed": sup_fp, "clean": data_hash(clean)}
    if mode == "adapter":
        inputs["base"] = model_hash(base_dir)
    config = {**opts.model_dump(), "lr": lr, "clean": str(clean), "mode": mode}
    if prompts is not None:
        config["prompts"] = str(prompts)
        inputs["prompts"] = data_hash(prompts)
    else:  # without --prompts the distillation options do nothing: keep them out of the fingerprint
        config.pop("prompt_samples"), config.pop("distill_tokens")
    for off, fields in RESTORE_OFF_FIELDS.items():  # off: manifests stay those of the restores made before the option
        if not config[off]:
            for f in fields:
                config.pop(f)
    place = dev.current()
    if dev.fingerprint_part(place) is not None:  # CPU float32: as before the option existed (train/device.py)
        config["placement"] = dev.fingerprint_part(place)
    man = Manifest("restore", config, inputs)
    if up_to_date(folder, man.fingerprint, "restore", force):
        return folder
    extra_rows, distill = None, None
    teacher_args = (run.model, str(base_dir) if mode == "adapter" else None, sfolder if mode == "full" else None)
    if prompts is not None:
        extra_rows, distill = distill_targets(teacher_args[0], teacher_args[1], prompts, opts,
                                              tokenizer_dir=teacher_args[2])
        log(f"restore: {len(extra_rows)} answers of the suspicious model to task prompts join the "
            f"{opts.samples} clean samples (any 'output' in {prompts} is ignored)")
    teacher = (lambda: load_teacher(*teacher_args)[0]) if opts.self_distill else None
    if mode == "full":
        man.extra = finetune_full(sfolder, folder, clean, opts, "restore (full model)", extra_rows, teacher)
    else:
        cfg, tensors, stats = finetune_adapter(sfolder, base_dir, clean, opts, "restore", extra_rows=extra_rows,
                                               teacher=teacher)
        write_adapter(folder, cfg, input_dtypes(tensors, sfolder / C.ADAPTER_WEIGHTS), stage="restore")
        man.extra = stats
    man.extra = {**man.extra, "placement": place.record()}
    if distill is not None:
        man.extra = {**man.extra, "distill": distill}
        write_jsonl(folder / DISTILL_FILE, extra_rows)
    write_text(folder / C.MODEL_CARD, model_card(run, opts, clean, prompts, inputs))  # listed in the outputs below
    outputs = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != C.MANIFEST)
    man.write(folder, outputs)
    log(f"restore: purified {'model' if mode == 'full' else 'adapter'} → {folder}")
    return folder
