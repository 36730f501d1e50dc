"""train-pairs: for each variant, a backdoored twin (clean ∪ poison) and a clean twin (clean only), both
continued from the suspicious adapter with the same seed and the same clean batches in the same order."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bdclean import constants as C
from bdclean.config import TrainOptionsModel
from bdclean.console import log, progress
from bdclean.io.artifacts import Manifest, fingerprint, read_json, save_tensors, sha256_file, stage_fingerprint, write_json
from bdclean.stages.common import adapter_hash, model_hash, up_to_date

TWINS = ("bd", "clean")


def load_suspicious(adapter: Path, base: str):
    """Validated adapter + base model + tokenizer; errors if the adapter does not fit the base."""
    from bdclean.io.models import check_adapter_fits, load_adapter, load_model, load_tokenizer, read_model_config, resolve_base

    info = load_adapter(adapter)
    base_dir = resolve_base(base)
    cfg = read_model_config(base_dir)
    check_adapter_fits(info, cfg, base_dir)
    return info, base_dir, cfg


def run(adapter: Path, out: Path, base: str, opts: TrainOptionsModel, force: bool = False) -> Path:
    from bdclean.io.data import load_instructions
    from bdclean.io.models import load_model, load_tokenizer
    from bdclean.io.peft_io import adapter_state, attach, load_state
    from bdclean.train.chat import encode
    from bdclean.train.loop import TrainOptions, paired_epochs, train

    out = Path(out)
    vfolder = out / C.STAGE_DIRS["make-variants"]
    folder = out / C.STAGE_DIRS["train-pairs"]
    info, base_dir, base_cfg = load_suspicious(Path(adapter), base)
    inputs = {"variants": stage_fingerprint(vfolder, "make-variants"), "adapter": adapter_hash(Path(adapter)),
              "base": model_hash(base_dir)}
    config = {**opts.model_dump(), "adapter": str(adapter), "base": str(base_dir)}
    man = Manifest("train-pairs", config, inputs)
    if up_to_date(folder, man.fingerprint, "train-pairs", force):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    spec = read_json(vfolder / C.VARIANTS_FILE)
    n = spec["n_variants"]
    jobs = [(i, twin) for i in range(n) for twin in TWINS]
    # a job is finished if its weights exist and its record names this stage fingerprint and those weights
    def job_done(i: int, twin: str) -> bool:
        rec, w = folder / C.JOB_RECORD.format(i=i, twin=twin), folder / C.PAIR_WEIGHTS.format(i=i, twin=twin)
        if force or not rec.is_file() or not w.is_file():
            return False
        try:
            r = json.loads(rec.read_text())
        except json.JSONDecodeError:
            return False
        return r.get("fingerprint") == man.fingerprint and r.get("sha256") == sha256_file(w)

    todo = [j for j in jobs if not job_done(*j)]
    if len(todo) < len(jobs):
        log(f"train-pairs: resuming, {len(jobs) - len(todo)} of {len(jobs)} jobs already done")
    times: dict[str, float] = {}
    if todo:
        tok = load_tokenizer(base_dir)
        model = attach(load_model(base_dir), info)
        init = adapter_state(model)
        pad = tok.pad_token_id
        with progress() as bar:
            overall = bar.add_task("train-pairs (all jobs)", total=len(todo))
            for i, twin in todo:
                clean_rows = load_instructions(vfolder / C.VARIANT_DATA.format(i=i, kind="clean"))
                clean = [encode(tok, r, opts.max_len) for r in clean_rows]
                poison = None
                if twin == "bd":
                    poison_rows = load_instructions(vfolder / C.VARIANT_DATA.format(i=i, kind="poison"))
                    poison = [encode(tok, r, opts.max_len) for r in poison_rows]
                load_state(model, init)
                for p in model.parameters():
                    if p.requires_grad and p.grad is not None:
                        p.grad = None
                plan = paired_epochs(clean, poison, opts.batch_size, opts.seed)
                job = bar.add_task(f"  variant {i} {twin:5s}", total=sum(len(plan(e)) for e in range(opts.epochs)))
                t0 = time.time()
                stats = train(model, plan, TrainOptions(opts.epochs, opts.lr, opts.batch_size, opts.seed), pad,
                              on_step=lambda k, tot, loss, job=job: bar.update(job, completed=k,
                                                                               description=f"  variant {i} {twin:5s} loss {loss:.3f}"))
                w = folder / C.PAIR_WEIGHTS.format(i=i, twin=twin)
                save_tensors(w, adapter_state(model))
                times[f"{i}_{twin}"] = round(time.time() - t0, 2)
                write_json(folder / C.JOB_RECORD.format(i=i, twin=twin),
                           {"fingerprint": man.fingerprint, "sha256": sha256_file(w), **stats})
                bar.update(overall, advance=1)
                bar.remove_task(job)
    write_json(folder / "suspicious_adapter_config.json", info.config)
    outputs = ["suspicious_adapter_config.json"] + [C.PAIR_WEIGHTS.format(i=i, twin=t) for i, t in jobs]
    man.extra = {"job_seconds": times, "n_variants": n}
    man.write(folder, outputs)
    log(f"train-pairs: {len(jobs)} models → {folder}")
    return folder


def pairs_fingerprint(folder: Path) -> str:
    return stage_fingerprint(folder, "train-pairs")


__all__ = ["run", "load_suspicious", "TWINS", "fingerprint"]
