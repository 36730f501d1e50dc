"""train-pairs: for each variant, a backdoored twin (clean ∪ poison) and a clean twin (clean only), both
continued from the suspicious adapter with the same seed and the same clean batches in the same order."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from bdclean import constants as C
from bdclean.config import PairsOptions
from bdclean.core.arch import ALL_PROJ
from bdclean.console import log
from bdclean.io.artifacts import Manifest, fingerprint, read_json, sha256_file, stage_fingerprint, write_json
from bdclean.io.fingerprints import adapter_hash, model_hash
from bdclean.pipeline.folders import check_out_inputs, up_to_date

TWINS = ("bd", "clean")


@dataclass
class Suspicious:
    """The model under purification: a LoRA adapter on a base, or a full checkpoint."""

    kind: str  # "adapter" | "full"
    path: Path  # the adapter dir or the full model dir
    base_dir: Path  # the model the LoRA (suspicious, or the variants' own) is attached to
    model_cfg: dict  # config.json of base_dir
    info: object = None  # AdapterInfo for adapters
    tokenizer: object = None  # TokenizerChoice of a full checkpoint, once chosen (purify's preflight)
    memory: dict | None = None  # purify's memory estimate (preflight)

    def digest(self) -> str:
        return adapter_hash(self.path) if self.kind == "adapter" else model_hash(self.path)


# full-model threat model: variants are LoRA adapters trained on top of the full checkpoint (the documented cheaper
# option of METHOD.md); their deltas live in the same ΔW space as adapter-only variants
FULL_VARIANT_LORA = {"r": 8, "lora_alpha": 16, "target_modules": list(ALL_PROJ)}


def load_suspicious(path: Path, base: str | None, full: bool | None = None) -> Suspicious:
    """Validate the suspicious model. A directory with adapter_config.json is an adapter (on ``base``); one with
    config.json and safetensors weights is a full checkpoint (``full=True`` forces that reading)."""
    from bdclean.core.arch import family
    from bdclean.errors import InputError
    from bdclean.io.headers import check_fits, header_bytes, regular_file
    from bdclean.io.vetting import check_full_checkpoint
    from bdclean.io.models import load_adapter, model_weight_files, read_model_config, resolve_base
    from bdclean.io.peft_io import check_structure

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: suspicious model directory not found")
    has_adapter_cfg = (path / C.ADAPTER_CONFIG).is_file()
    is_adapter = has_adapter_cfg and not full
    if not is_adapter and not (path / C.MODEL_CONFIG).is_file():
        if has_adapter_cfg:
            raise InputError(f"{path}: --full was given, but this is a PEFT adapter ({C.ADAPTER_CONFIG}, no "
                             f"{C.MODEL_CONFIG}); drop --full to purify it as an adapter")
        raise InputError(f"{path}: neither a PEFT adapter (no {C.ADAPTER_CONFIG}) nor a full model (no {C.MODEL_CONFIG})")
    if is_adapter:
        base_dir = resolve_base("smollm2" if base is None else base)  # '' is refused there, not read as the alias
        cfg = read_model_config(base_dir)
        family(cfg.get("model_type"), base_dir / C.MODEL_CONFIG)
        info = load_adapter(path, cfg, base_dir)  # checked against the base before its tensors are read
        check_structure(info, base_dir)
        return Suspicious("adapter", path, base_dir, cfg, info)
    regular_file(path / C.MODEL_CONFIG, path, "config.json")
    cfg = read_model_config(path)
    family(cfg.get("model_type"), path / C.MODEL_CONFIG)
    if (path / C.SAFETENSORS_INDEX).exists() or (path / C.SAFETENSORS_INDEX).is_symlink():
        regular_file(path / C.SAFETENSORS_INDEX, path, "the shard index")
    files = [regular_file(f, path, "a weight file") for f in model_weight_files(path)]
    _, header = check_full_checkpoint(path, cfg, files)
    check_fits(header_bytes(header, 4), f"{path} (its weights in float32)")
    return Suspicious("full", path, path, cfg)


def trusted_tokenizer(sus: Suspicious, tokenizer: str | None, accept: bool):
    """A full checkpoint's trusted tokenizer (io/tokenizers.py); None for an adapter, which uses its base's."""
    from bdclean.errors import UsageError
    from bdclean.io.tokenizers import choose

    if sus.kind == "adapter":
        if tokenizer is not None or accept:
            raise UsageError("--tokenizer and --accept-tokenizer apply to full checkpoints; an adapter is always used "
                             "with its base's tokenizer (--base)")
        return None
    return choose(sus.path, sus.model_cfg, tokenizer, accept)


def variant_lora_config(sus: Suspicious) -> dict:
    """The LoRA config the variants train: the suspicious adapter's own, or FULL_VARIANT_LORA for checkpoints."""
    if sus.kind == "adapter":
        return dict(sus.info.config)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0, "bias": "none", **FULL_VARIANT_LORA}


def run(adapter: Path, out: Path, base: str | None, opts: PairsOptions, force: bool = False,
        full: bool | None = None, tokenizer: str | None = None, accept_tokenizer: bool = False) -> Path:
    from bdclean.pipeline.pairs_jobs import JobContext, check_gpu_workers, plan_workers, run_inline, run_parallel
    from bdclean.train import device as dev
    from bdclean.train.loop import cpu_count

    out = Path(out)
    place = dev.current()
    check_gpu_workers(opts, place)
    if opts.executor == "ray":  # Ray missing or its cluster unreachable: one line before anything is written
        from bdclean.pipeline.pairs_ray import preflight

        preflight(opts.ray_address)
    vfolder = out / C.STAGE_DIRS["make-variants"]
    folder = out / C.STAGE_DIRS["train-pairs"]
    sus = load_suspicious(Path(adapter), base, full)
    base_dir = sus.base_dir
    check_out_inputs(out, ("train-pairs",), sus.path, base_dir)
    tok = trusted_tokenizer(sus, tokenizer, accept_tokenizer)
    lcfg = variant_lora_config(sus)
    inputs = {"variants": stage_fingerprint(vfolder, "make-variants"), "adapter": sus.digest(),
              "base": model_hash(base_dir)}
    # how the twins are scheduled (workers, threads) is an execution detail like the CPU model, not an input: on
    # the demo, 1-thread workers and 2-thread in-process training gave bit-identical twins; both are recorded
    config = {**opts.model_dump(exclude={"workers", "executor", "ray_address"}), "adapter": str(adapter),
              "base": str(base_dir), "mode": sus.kind, "variant_lora": lcfg}
    if tok is not None:  # full checkpoints only: adapter fingerprints stay as they were
        inputs["tokenizer"] = tok.digest
        config["tokenizer"] = tok.record()
    if dev.fingerprint_part(place) is not None:  # CPU float32: fingerprints as before (train/device.py)
        config["placement"] = dev.fingerprint_part(place)
    man = Manifest("train-pairs", config, inputs)
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
    times: dict[str, float] = {}
    workers, threads = 0, cpu_count()
    ray_info: dict = {}
    if todo:
        workers, threads = plan_workers(opts.workers, len(todo), base_dir) if not place.cuda else (1, cpu_count())
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
                 "paths": {"adapter": str(Path(adapter).resolve()), "base": str(Path(base_dir).resolve())}}
    if tok is not None:
        man.extra["paths"]["tokenizer"] = str(tok.source)
    man.extra["executor"] = {"name": opts.executor, **ray_info}  # recorded, not fingerprinted (as workers)
    man.extra["placement"] = place.record()
    write_json(folder / "suspicious_adapter_config.json", lcfg)
    outputs = ["suspicious_adapter_config.json"] + [C.PAIR_WEIGHTS.format(i=i, twin=t) for i, t in jobs]
    man.write(folder, outputs)
    log(f"train-pairs: {len(jobs)} models → {folder}")
    return folder


def load_any(model_path: Path, base: str):
    """(model, tokenizer, kind) for a PEFT adapter directory (on ``base``) or a full HF model directory."""
    from bdclean.errors import InputError
    from bdclean.io.models import load_tokenizer
    from bdclean.train.device import load_placed

    model_path = Path(model_path)
    if not model_path.is_dir():
        raise InputError(f"{model_path}: model or adapter directory not found")
    if (model_path / C.ADAPTER_CONFIG).is_file():
        from bdclean.io.peft_io import attach

        sus = load_suspicious(model_path, base)
        # merged for evaluation: the same function without the LoRA side-path on every projection (faster generation)
        model = attach(load_placed(sus.base_dir), sus.info).merge_and_unload()
        return model, load_tokenizer(sus.base_dir), "adapter"
    model = load_placed(model_path)
    return model, load_tokenizer(model_path), "full"


__all__ = ["run", "load_suspicious", "load_any", "TWINS", "fingerprint"]
