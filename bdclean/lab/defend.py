"""defend: baseline defenses (paper Table 2 columns). For an adapter (below); for a full checkpoint, the full-model
baselines of lab/defend_full.py.

finetune    continue training the suspicious adapter on the restore stage's clean samples / epochs / lr
prune       magnitude pruning: zero the τ fraction (global) of MLP channels whose own ΔW channel vector
            (gate row j, up row j, down column j of s·B@A) is smallest; no fine-tuning
fine-prune  zero a seeded random τ fraction of MLP channels (the adapter-only variant of the paper), then finetune
quantize    merge the adapter into the base, INT4 round-to-nearest every decoder Linear (and an untied lm_head),
            dequantize, write a full HF model directory
crow        fine-tune on LM loss + α · layer-consistency loss on FGSM-perturbed embeddings (lab/crow.py)
retrain     discard the adapter entirely: a fresh adapter with its LoRA config and PEFT's own initialisation
            (seeded; nothing of the suspicious tensors survives), trained by restore's fine-tune. Alone it is
            "fine-tune the base"; with --prompts it distils the suspicious adapter's answers into a fresh student
reset       the trivial defense every result is compared with: the adapter's change to every MLP channel and
            attention unit zeroed (ΔW = 0 exactly; the factor on the other side is kept so training can move),
            then exactly restore's fine-tune (same samples, epochs, lr, seed and --prompts)

Methods that fine-tune take ``--prompts`` as restore does: the suspicious adapter's own answers to those task
prompts join the clean samples, so reset and bdclean are compared in the same data regime.

Every method writes OUT/ (an adapter; a full model for quantize and for a full checkpoint) and OUT/manifest.json;
a finished, unchanged output is skipped on rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from bdclean import constants as C
from bdclean.config import BASELINE_PRUNE_TAU, DEFAULT_TAU, RESTORE_OFF_FIELDS, RestoreOptions
from bdclean.console import log
from bdclean.errors import UsageError, require
from bdclean.io.artifacts import Manifest, load_manifest, stage_marked
from bdclean.io.fingerprints import adapter_hash, data_hash, model_hash
from bdclean.pipeline.folders import up_to_date

if TYPE_CHECKING:  # torch is imported where it is used: `bdclean --help` builds defend's flags from this module
    import torch

METHODS = ("finetune", "prune", "fine-prune", "quantize", "crow", "reset", "retrain")
RESTORE_LIKE = ("reset", "retrain")  # bdclean's restore with nothing of the update kept: restore's defaults
RANDOM_SELECTION = "random (adapter-only, as in the paper)"
MAGNITUDE_SELECTION = "smallest ‖s·B@A‖ channel norm (magnitude pruning)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
_TRAIN_FIELDS = tuple(RestoreOptions.model_fields)


class DefendOptions(RestoreOptions):
    """RestoreOptions (samples, epochs, lr, batch_size, max_len, seed) plus the baselines' own settings."""

    lr: float | None = Field(None, gt=0, lt=1, description="learning rate of the fine-tuning baselines; default "
                             "restore's: 2e-4 for an adapter, 1e-5 for a full checkpoint (the CROW paper used 1e-3)")
    tau: float | None = Field(None, gt=0, lt=1, description="fraction of MLP channels pruned (prune, fine-prune); "
                              f"default {BASELINE_PRUNE_TAU} for an adapter, the full-model signature's "
                              f"{DEFAULT_TAU['full']} for a full checkpoint")
    augment: float | None = Field(None, ge=0, le=8, allow_inf_nan=False,
                                  description="trigger-invariance copies per fine-tuning row (restore's --augment); "
                                              "default: restore's for reset and retrain (2 for an adapter, 0 for a "
                                              "full checkpoint), so reset is bdclean with nothing kept; 0 for the "
                                              "published baselines, as published")
    crow_alpha: float = Field(5.5, ge=0, description="weight of CROW's consistency loss")
    crow_eps: float = Field(0.1, ge=0, description="FGSM step on the input embeddings (CROW)")
    group_size: int = Field(128, ge=1, description="INT4 quantization group size along the input dim")


USES: dict[str, tuple[str, ...]] = {
    "finetune": _TRAIN_FIELDS,
    "prune": ("tau",),
    "fine-prune": _TRAIN_FIELDS + ("tau",),
    "quantize": ("group_size",),
    "crow": _TRAIN_FIELDS + ("crow_alpha", "crow_eps"),
    "reset": _TRAIN_FIELDS,
    "retrain": _TRAIN_FIELDS,
}


def check_method(method: str) -> None:
    require(method in METHODS, f"unknown defense {method!r}; choose one of {', '.join(METHODS)}")


def restore_options(opts: DefendOptions) -> RestoreOptions:
    return RestoreOptions(**opts.model_dump(include=set(_TRAIN_FIELDS)))


def mlp_modules(base_cfg: dict) -> list[dict[str, str]]:
    """Per layer, the PEFT key prefixes of gate/up/down."""
    from bdclean.core.arch import mlp_module_names, peft_key

    names = mlp_module_names(base_cfg["model_type"], int(base_cfg["num_hidden_layers"]))
    return [{k: peft_key(v) for k, v in layer.items()} for layer in names]


def channel_norms(info, base_cfg: dict) -> torch.Tensor:
    """‖ΔW channel j‖ = ‖(gate row j, up row j, down column j) of s·B@A‖ per layer and channel, [layers, I]."""
    import torch

    from bdclean.core.channels import LowRank, channel_gram

    modules = mlp_modules(base_cfg)
    norms = torch.zeros(len(modules), int(base_cfg["intermediate_size"]), dtype=torch.float64)
    for layer, names in enumerate(modules):
        parts: dict[str, list] = {}
        for part in ("gate", "up", "down"):
            ka, kb = names[part] + ".lora_A.weight", names[part] + ".lora_B.weight"
            if ka not in info.tensors:
                parts[part] = [None]
                continue
            a, b = info.tensors[ka].double(), info.tensors[kb].double()
            parts[part] = [LowRank(b * info.scaling(names[part], a.shape[0]), a)]
        if all(p[0] is None for p in parts.values()):
            continue  # the adapter leaves this layer's MLP alone: every channel has norm 0
        G = channel_gram(parts["gate"], parts["up"], parts["down"])  # [I, 1, 1]
        norms[layer] = G[:, 0, 0].clamp_min(0).sqrt()
    return norms


def magnitude_mask(info, base_cfg: dict, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the ⌈τ·L·I⌉ smallest-norm channels, global; the norms)."""
    from bdclean.core.score import select_top

    norms = channel_norms(info, base_cfg)
    return select_top(-norms, tau, "global"), norms


def random_mask(layers: int, channels: int, tau: float, seed: int) -> torch.Tensor:
    import torch

    from bdclean.core.score import fraction_count

    k = fraction_count(tau, layers * channels)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(layers * channels, dtype=torch.bool)
    mask[torch.randperm(layers * channels, generator=gen)[:k]] = True
    return mask.view(layers, channels)


# ---------------------------------------------------------------- the methods


def _finetune(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.io.peft_io import write_adapter
    from bdclean.train.finetune import finetune_adapter

    cfg, tensors, stats = finetune_adapter(ctx["adapter"], ctx["base_dir"], ctx["clean"], restore_options(opts),
                                           "defend finetune", extra_rows=ctx["extra_rows"],
                                           teacher=ctx["teacher"])
    write_adapter(ctx["out"], cfg, tensors, stage="defend")
    return {"train": stats}


def _prune(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.core.masks import suppress_lora_channels
    from bdclean.io.peft_io import write_adapter

    info, base_cfg = ctx["info"], ctx["base_cfg"]
    mask, norms = magnitude_mask(info, base_cfg, opts.tau)
    tensors, changed = suppress_lora_channels(info.tensors, mask, mlp_modules(base_cfg))
    write_adapter(ctx["out"], info.config, tensors, stage="defend")
    return {"selection": MAGNITUDE_SELECTION, "channels_pruned": int(mask.sum()), "channels_total": mask.numel(),
            "tensors_changed": changed, "max_pruned_norm": float(norms[mask].max()) if mask.any() else None,
            "min_kept_norm": float(norms[~mask].min()) if (~mask).any() else None}


def _fine_prune(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.core.masks import suppress_lora_channels
    from bdclean.io.peft_io import write_adapter
    from bdclean.train.finetune import finetune_adapter

    info, base_cfg, out = ctx["info"], ctx["base_cfg"], ctx["out"]
    modules = mlp_modules(base_cfg)
    mask = random_mask(len(modules), int(base_cfg["intermediate_size"]), opts.tau, opts.seed)
    tensors, changed = suppress_lora_channels(info.tensors, mask, modules)
    cfg, tuned, stats = finetune_adapter(ctx["adapter"], ctx["base_dir"], ctx["clean"], restore_options(opts),
                                         "defend fine-prune", tensors=tensors, extra_rows=ctx["extra_rows"],
                                         teacher=ctx["teacher"])
    write_adapter(out, cfg, tuned, stage="defend")
    return {"selection": RANDOM_SELECTION, "channels_pruned": int(mask.sum()), "channels_total": mask.numel(),
            "tensors_changed": changed, "mask_seed": opts.seed, "train": stats}


def _quantize(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.io.artifacts import atomic_dir
    from bdclean.io.models import load_model
    from bdclean.io.peft_io import attach
    from bdclean.lab.quant import quantize_decoder

    base_dir = ctx["base_dir"]
    model = attach(load_model(base_dir), ctx["info"]).merge_and_unload()
    facts = quantize_decoder(model, opts.group_size)
    with atomic_dir(ctx["out"], "defend") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp / name)
    return facts


def _crow(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.io.peft_io import write_adapter
    from bdclean.train.finetune import finetune_adapter
    from bdclean.lab.crow import crow_loss

    # the same samples, batches and optimiser as finetune; only the loss differs
    cfg, tensors, stats = finetune_adapter(ctx["adapter"], ctx["base_dir"], ctx["clean"], restore_options(opts),
                                           "defend crow", loss_fn=crow_loss(opts.crow_alpha, opts.crow_eps),
                                           extra_rows=ctx["extra_rows"])
    write_adapter(ctx["out"], cfg, tensors, stage="defend")
    return {"train": {**stats, "alpha": opts.crow_alpha, "eps": opts.crow_eps}}


def reset_tensors(info, base_cfg: dict) -> tuple[dict, int]:
    """The adapter with its change to every MLP channel and every attention unit zeroed: what suppress writes for a
    signature of everything. ΔW = 0 in every module, and each module keeps one factor so a fine-tune can train."""
    import torch

    from bdclean.core.arch import attn_module_names, head_geometry, peft_key
    from bdclean.core.masks import suppress_lora_channels, suppress_lora_heads

    modules = mlp_modules(base_cfg)
    L = len(modules)
    mask = torch.ones(L, int(base_cfg["intermediate_size"]), dtype=torch.bool)
    tensors, changed = suppress_lora_channels(info.tensors, mask, modules)
    n_q, n_kv, hd = head_geometry(base_cfg)
    attn = [{k: peft_key(v) for k, v in names.items()} for names in attn_module_names(base_cfg["model_type"], L)]
    tensors, hchanged = suppress_lora_heads(tensors, [(layer, g) for layer in range(L) for g in range(n_kv)], attn,
                                            n_q, n_kv, hd)
    return tensors, changed + hchanged


def _reset(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.io.peft_io import write_adapter
    from bdclean.train.finetune import finetune_adapter
    from bdclean.pipeline.suppress import kept_update

    info, base_cfg = ctx["info"], ctx["base_cfg"]
    tensors, changed = reset_tensors(info, base_cfg)
    kept = kept_update(info, tensors, {m[p] for m in mlp_modules(base_cfg) for p in m})
    cfg, tuned, stats = finetune_adapter(ctx["adapter"], ctx["base_dir"], ctx["clean"], restore_options(opts),
                                         "defend reset", tensors=tensors, extra_rows=ctx["extra_rows"],
                                         teacher=ctx["teacher"])
    write_adapter(ctx["out"], cfg, tuned, stage="defend")
    return {"tensors_changed": changed, "kept_update_share_before_restore": kept, "train": stats}


def fresh_tensors(info, base_dir: Path, seed: int) -> dict:
    """LoRA tensors as PEFT initialises them for this adapter's config (A random, B zero), from ``seed``."""
    import torch

    from bdclean.io.models import load_model
    from bdclean.io.peft_io import adapter_state, lora_config, new_lora

    torch.manual_seed(seed)
    return adapter_state(new_lora(load_model(base_dir), lora_config(info)))


def _retrain(ctx: dict, opts: DefendOptions) -> dict:
    from bdclean.io.peft_io import write_adapter
    from bdclean.train.finetune import finetune_adapter

    tensors = fresh_tensors(ctx["info"], ctx["base_dir"], opts.seed)
    cfg, tuned, stats = finetune_adapter(ctx["adapter"], ctx["base_dir"], ctx["clean"], restore_options(opts),
                                         "defend retrain", tensors=tensors, extra_rows=ctx["extra_rows"],
                                         teacher=ctx["teacher"])
    write_adapter(ctx["out"], cfg, tuned, stage="defend")
    return {"init": "PEFT default (fresh)", "init_seed": opts.seed, "kept_update_share_before_restore": {"all": 0.0},
            "train": stats}


_RUN = {"finetune": _finetune, "prune": _prune, "fine-prune": _fine_prune, "quantize": _quantize, "crow": _crow, "reset": _reset, "retrain": _retrain}


def _check_out(out: Path, adapter: Path) -> None:
    """OUT is replaced as a whole: refuse a folder that is not a previous defend output."""
    require(out.resolve() != adapter.resolve(), f"{out}: --out must differ from the suspicious adapter")
    if out.exists():
        require(out.is_dir(), f"{out}: exists and is not a directory")
        man = load_manifest(out)
        if man is None and stage_marked(out, "defend"):  # an interrupted defend (io/artifacts.py atomic_dir)
            return
        if any(out.iterdir()) and (man is None or man.get("stage") != "defend"):
            raise UsageError(f"{out}: exists and is not a defend output; choose another --out")


def run(method: str, adapter: Path, out: Path, base: str | None = None, clean: str = "builtin",
        opts: DefendOptions | None = None, force: bool = False, prompts: str | None = None,
        tokenizer: str | None = None, accept_tokenizer: bool = False) -> Path:
    """Apply one baseline defense to the suspicious model, a PEFT adapter (on ``base``) or a full checkpoint
    (lab/defend_full.py; ``base`` = the model it was fine-tuned from, for reset); returns OUT (an adapter, or a full
    model for quantize and for every full-checkpoint method)."""
    from bdclean.pipeline.run import load_suspicious, trusted_tokenizer
    from bdclean.train.finetune import with_defaults

    check_method(method)
    opts = opts or DefendOptions()
    adapter, out = Path(adapter), Path(out)
    _check_out(out, adapter)
    sus = load_suspicious(adapter, base)
    full = sus.kind == "full"
    if full:
        from bdclean.lab import defend_full

        defend_full.check_method(method, base)
    choice = trusted_tokenizer(sus, tokenizer, accept_tokenizer)  # adapters: refuses --tokenizer, returns None
    # per-kind defaults resolved before the fingerprint (an adapter's config is what it was before they existed)
    if opts.augment is None and method not in RESTORE_LIKE:  # the published baselines as published
        opts = opts.model_copy(update={"augment": 0.0})
    opts = with_defaults(opts, sus.kind).model_copy(
        update={"tau": opts.tau or (DEFAULT_TAU["full"] if full else BASELINE_PRUNE_TAU)})
    uses_data = "samples" in USES[method]
    if full:
        config = {"method": method, "mode": "full", "model": str(adapter),
                  **opts.model_dump(include=set(USES[method]))}
        inputs = {"model": sus.digest(), "tokenizer": choice.digest}
        if method == "reset":
            from bdclean.io.models import read_model_config, resolve_base

            base_dir = resolve_base(base)
            defend_full.check_same_shape(base_dir, read_model_config(base_dir), sus.model_cfg, adapter)
            config["base"], inputs["base"] = str(base_dir), model_hash(base_dir)
        if choice.differences:
            config["accepted_tokenizer_differences"] = choice.differences
    else:
        config = {"method": method, "adapter": str(adapter), "base": str(sus.base_dir),
                  **opts.model_dump(include=set(USES[method]))}
        inputs = {"adapter": adapter_hash(adapter), "base": model_hash(sus.base_dir)}
    if uses_data:
        config["clean"] = str(clean)
        inputs["clean"] = data_hash(clean)
    if prompts is not None:
        require(uses_data, f"--prompts feeds a fine-tune; {method} does not fine-tune", UsageError)
        from bdclean.io.data import sample_prompts

        sample_prompts(prompts, 1, 0)  # a bad file fails before any work
        config["prompts"] = str(prompts)
        inputs["prompts"] = data_hash(prompts)
    elif uses_data:
        config.pop("prompt_samples", None), config.pop("distill_tokens", None)
    for off, fields in RESTORE_OFF_FIELDS.items():  # off: the manifests of defenses made before the option stay valid
        if not config.get(off, 1):
            for f in fields:
                config.pop(f, None)
    for name in ("self_distill", "adversarial"):
        flag = "--" + name.replace("_", "-")
        require(not (getattr(opts, name) and method == "crow"), f"{flag} replaces the fine-tune's loss; CROW has "
                "its own (use it with finetune, fine-prune, reset or retrain)", UsageError)
    require(not (opts.self_distill and opts.adversarial), "--self-distill and --adversarial each replace the "
            "fine-tune's loss; use one", UsageError)
    require(uses_data or not (opts.self_distill or opts.adversarial or opts.augment), "--self-distill, "
            f"--adversarial and --augment change a fine-tune; {method} does not fine-tune", UsageError)
    from bdclean.train import device as dev

    if uses_data and dev.fingerprint_part(dev.current()) is not None:  # a fine-tune off CPU float32 (train/device.py)
        config["placement"] = dev.fingerprint_part(dev.current())
    man = Manifest("defend", config, inputs)
    if up_to_date(out, man.fingerprint, f"defend {method}", force):
        return out
    extra_rows, distill = None, None
    if prompts is not None:
        from bdclean.pipeline.restore import distill_targets

        extra_rows, distill = distill_targets(adapter, None if full else str(sus.base_dir), prompts,
                                              restore_options(opts), choice.source if full else None)
    teacher = None
    if opts.self_distill:
        from bdclean.pipeline.restore import load_teacher

        def teacher():
            return load_teacher(adapter, None if full else str(sus.base_dir), choice.source if full else None)[0]
    ctx = {"adapter": adapter, "out": out, "info": sus.info, "base_dir": sus.base_dir, "base_cfg": sus.model_cfg,
           "clean": clean, "extra_rows": extra_rows, "teacher": teacher}
    if full:
        ctx.update(model=adapter, cfg=sus.model_cfg, tokenizer=choice,
                   base_dir=Path(config["base"]) if method == "reset" else None)
        facts = defend_full.run_method(method, ctx, opts, restore_options(opts))
        if choice.differences:
            facts["tokenizer"] = choice.record()
    else:
        facts = _RUN[method](ctx, opts)
    man.extra = {"method": method, **facts, "placement": dev.current().record()}
    if distill is not None:
        from bdclean.io.artifacts import write_jsonl
        from bdclean.pipeline.restore import DISTILL_FILE

        man.extra["distill"] = distill
        write_jsonl(out / DISTILL_FILE, extra_rows)
    outputs = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != C.MANIFEST)
    man.write(out, outputs)
    log(f"defend {method}: {'model' if full or method == 'quantize' else 'adapter'} → {out}")
    return out
