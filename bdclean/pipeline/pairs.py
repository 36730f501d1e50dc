"""train-pairs: for each variant, a backdoored twin (clean ∪ poison) and a clean twin (clean only), both
continued from the suspicious adapter with the same seed and the same clean batches in the same order."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bdclean import constants as C
from bdclean.config import PairsOptions
from bdclean.console import log
from bdclean.core.arch import ALL_PROJ
from bdclean.io.artifacts import Manifest, read_json, sha256_file, stage_fingerprint, write_json
from bdclean.io.fingerprints import model_hash
from bdclean.pipeline.folders import check_out_inputs, up_to_date
from bdclean.pipeline.run import Run, Suspicious, trusted_tokenizer

TWINS = ("bd", "clean")


# full-model threat model: variants are LoRA adapters trained on top of the full checkpoint (the documented cheaper
# option of METHOD.md); their deltas live in the same ΔW space as adapter-only variants
FULL_VARIANT_LORA = {"r": 8, "lora_alpha": 16, "target_modules": list(ALL_PROJ)}


# --variant-training full: the twins train the checkpoint's own decoder projection weights (embeddings, norms and
# the LM head stay frozen: the signature has no unit there), written densely under their model names
DENSE_TWINS = {"variant_training": "full", "trained": "decoder projection weights"}


def variant_lora_config(sus: Suspicious, variant_training: str = "lora") -> dict:
    """The LoRA config the variants train: the suspicious adapter's own, or FULL_VARIANT_LORA for checkpoints;
    DENSE_TWINS when the twins fine-tune the checkpoint's weights themselves."""
    if sus.kind == "adapter":
        return dict(sus.info.config)
    if variant_training == "full":
        return dict(DENSE_TWINS)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", **FULL_VARIANT_LORA}


def dense_twin_bytes(sus: Suspicious) -> int:
    """Bytes of one dense twin on disk: every decoder projection weight in float32 (from the config's sizes)."""
    from bdclean.io.headers import config_dims, part_shapes

    dims = config_dims(sus.model_cfg, sus.base_dir / C.MODEL_CONFIG)
    return 4 * dims.layers * sum(i * o for i, o in part_shapes(dims).values())


def check_disk(folder: Path, need: int) -> None:
    """Refuse to start twins that would not fit on the disk of ``folder`` (one line, before any twin trains)."""
    import shutil

    from bdclean.errors import BdcleanError

    def size(b: int) -> str:
        return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    free = shutil.disk_usage(folder).free
    if free < need:
        raise BdcleanError(f"{folder}: the dense twins left to train need {size(need)} on disk and {size(free)} "
                           "are free; free space or use --variant-training lora")


def check_variant_training(kind: str, variant_training: str) -> None:
    """Dense twins are for full checkpoints: an adapter's twins train LoRA entries of its own shape."""
    if variant_training == "full" and kind == "adapter":
        from bdclean.errors import UsageError

        raise UsageError("--variant-training full applies to full checkpoints (with --full); an adapter's twins "
                         "train LoRA entries of its own shape")


def dense_twins(acfg: dict) -> bool:
    """Whether train-pairs wrote dense twins (its suspicious_adapter_config.json is ``acfg``)."""
    return acfg.get("variant_training") == "full"


def run(run: Run, opts: PairsOptions, force: bool = False, tokenizer: str | None = None,
        accept_tokenizer: bool = False) -> Path:
    from bdclean.pipeline.pairs_jobs import JobContext, check_gpu_workers, plan_workers, run_inline, run_parallel
    from bdclean.train import device as dev
    from bdclean.train.loop import cpu_count

    out = run.out
    place = dev.current()
    check_gpu_workers(opts, place)
    if opts.executor == "ray":  # Ray missing or its cluster unreachable: one line before anything is written
        from bdclean.pipeline.pairs_ray import preflight

        preflight(opts.ray_address)
    vfolder = out / C.STAGE_DIRS["make-variants"]
    folder = out / C.STAGE_DIRS["train-pairs"]
    sus = run.suspicious()
    base_dir = sus.base_dir
    check_out_inputs(out, ("train-pairs",), sus.path, base_dir)
    check_variant_training(sus.kind, opts.variant_training)
    dense = opts.variant_training == "full"
    tok = trusted_tokenizer(sus, tokenizer, accept_tokenizer)
    lcfg = variant_lora_config(sus, opts.variant_training)
    inputs = {"variants": stage_fingerprint(vfolder, "make-variants"), "adapter": run.digest(),
              "base": model_hash(base_dir)}
    # how the twins are scheduled (workers, threads) is an execution detail like the CPU model, not an input: on
    # the demo, 1-thread workers and 2-thread in-process training gave bit-identical twins; both are recorded
    # the dense-twin fields only when used, so LoRA twins keep the fingerprints they had before these existed
    skip = {"workers", "executor", "ray_address"} | (set() if dense else {"variant_training", "full_lr"})
    config = {**opts.model_dump(exclude=skip), "adapter": str(run.model),
              "base": str(base_dir), "mode": sus.kind, "variant_lora": lcfg}
    if tok is not None:  # full checkpoints only: adapter fingerprints stay as they were
        inputs["tokenizer"] = tok.digest
        config["tokenizer"] = tok.record()
    if dev.fingerprint_part(place) is not None:  # CPU float32: fingerprints as before (train/device.py)
        config["placement"] = dev.fingerprint_part(place)
    man = Manifest("train-pairs", config, inputs)
    run.recorded_digest = inputs["adapter"]  # the twins (made now or already) are of this model
    if up_to_date(folder, man.fingerprint, "train-pairs", force):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n = read_json(vfolder / C.VARIANTS_FILE)["n_variants"]
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
    if todo and dense:
        check_disk(folder, len(todo) * dense_twin_bytes(sus))
    times: dict[str, float] = {}
    workers, threads = 0, cpu_count()
    ray_info: dict = {}
    if todo:
        workers, threads = (plan_workers(opts.workers, len(todo), base_dir, dense) if not place.cuda
                            else (1, cpu_count()))
        ctx = JobContext(sus.kind, str(sus.path), str(base_dir), lcfg, opts.model_dump(), str(vfolder), str(folder),
                         man.fingerprint, threads, str(tok.source if tok is not None else base_dir), place)
        if opts.executor == "ray":  # one Ray task per twin; inputs and twins travel through the object store
            from bdclean.pipeline.pairs_ray import run_ray

            times, workers, threads, ray_info = run_ray(ctx, todo, opts.ray_address)
        elif workers > 1:
            log(f"train-pairs: {len(todo)} twins on {workers} processes × {threads} thread(s)")
            times = run_parallel(ctx, todo, workers)
        else:  # one twin left (or one worker): this process, every core
            threads = cpu_count()
            times = run_inline(dataclasses.replace(ctx, threads=None), todo)
    # absolute paths for the stages after this one, which may run from another directory (not fingerprinted:
    # the adapter's and base's contents are, through the inputs)
    man.extra = {"job_seconds": times, "n_variants": n, "workers": workers, "threads_per_twin": threads,
                 "paths": {"adapter": str(run.model.resolve()), "base": str(Path(base_dir).resolve())}}
    if tok is not None:
        man.extra["paths"]["tokenizer"] = str(tok.source)
    man.extra["executor"] = {"name": opts.executor, **ray_info}  # recorded, not fingerprinted (as workers)
    man.extra["placement"] = place.record()
    write_json(folder / "suspicious_adapter_config.json", lcfg)
    outputs = ["suspicious_adapter_config.json"] + [C.PAIR_WEIGHTS.format(i=i, twin=t) for i, t in jobs]
    man.write(folder, outputs)
    log(f"train-pairs: {len(jobs)} models → {folder}")
    return folder


__all__ = ["run", "variant_lora_config", "check_variant_training", "dense_twins", "FULL_VARIANT_LORA", "DENSE_TWINS",
           "TWINS"]
