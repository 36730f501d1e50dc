"""defend: baseline defenses for the adapter-only threat model (paper Table 2 columns).

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

Every method writes OUT/ (an adapter, or a full model for quantize) and OUT/manifest.json; a finished, unchanged
output is skipped on rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from bdclean import constants as C
from bdclean.config import BASELINE_PRUNE_TAU, RestoreOptions
from bdclean.console import log
from bdclean.errors import BdcleanError, UsageError, require
from bdclean.io.artifacts import Manifest, load_manifest, stage_marked
from bdclean.io.fingerprints import adapter_hash, data_hash, model_hash
from bdclean.pipeline.folders import up_to_date

if TYPE_CHECKING:  # torch is imported where it is used: `bdclean --help` builds defend's flags from this module
    import torch

METHODS = ("finetune", "prune", "fine-prune", "quantize", "crow", "reset", "retrain")
RANDOM_SELECTION = "random (adapter-only, as in the paper)"
MAGNITUDE_SELECTION = "smallest ‖s·B@A‖ channel norm (magnitude pruning)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "vocab.txt",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
_TRAIN_FIELDS = tuple(RestoreOptions.model_fields)


class DefendOptions(RestoreOptions):
    """RestoreOptions (samples, epochs, lr, batch_size, max_len, seed) plus the baselines' own settings."""

    lr: float = Field(2e-4, gt=0, lt=1, description="learning rate of the fine-tuning baselines (restore's, "
                                                     "adapter-only; the CROW paper used 1e-3)")
    tau: float = Field(BASELINE_PRUNE_TAU, gt=0, lt=1,
                       description="fraction of MLP channels pruned (prune, fine-prune)")
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
                                           "defend finetune", extra_rows=ctx["extra_rows"])
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
                                         "defend fine-prune", tensors=tensors, extra_rows=ctx["extra_rows"])
    write_adapter(out, cfg, tuned, stage="defend")
    return {"selection": RANDOM_SELECTION, "channels_pruned": int(mask.sum()), "channels_total": mask.numel(),
            "tensors_changed": changed, "mask_seed": opts.seed, "train": stats}


def _quantize(ctx: dict, opts: DefendOptions) -> dict:
    import torch

    from bdclean.lab.quant import max_distinct_per_group, quantize_rtn_int4
    from bdclean.io.artifacts import atomic_dir
    from bdclean.io.models import load_model
    from bdclean.io.peft_io import attach

    base_dir = ctx["base_dir"]
    model = attach(load_model(base_dir), ctx["info"]).merge_and_unload()
    targets = [(f"model.layers.{n}", m) for n, m in model.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear)]
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if head is not None and not tied:
        targets.append(("lm_head", head))
    n_weights, n_changed, distinct = 0, 0, 0
    with torch.no_grad():
        for _, mod in targets:
            w = mod.weight
            q = quantize_rtn_int4(w, opts.group_size)
            n_weights += w.numel()
            n_changed += int((q != w).sum())
            distinct = max(distinct, max_distinct_per_group(q, opts.group_size))
            w.copy_(q)
    require(distinct <= 16, f"internal error: {distinct} distinct values in a 4-bit group", BdcleanError)
    with atomic_dir(ctx["out"], "defend") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp / name)
    return {"scheme": "int4 round-to-nearest, asymmetric min/max per group, dequantized to float32",
            "group_size": opts.group_size, "modules_quantized": len(targets), "lm_head_quantized": not tied,
            "weights_quantized": n_weights, "fraction_changed": n_changed / n_weights if n_weights else 0.0,
            "max_distinct_per_group": distinct}


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
                                         "defend reset", tensors=tensors, extra_rows=ctx["extra_rows"])
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
                                         "defend retrain", tensors=tensors, extra_rows=ctx["extra_rows"])
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


def run(method: str, adapter: Path, out: Path, base: str = "smollm2", clean: str = "builtin",
        opts: DefendOptions | None = None, force: bool = False, prompts: str | None = None) -> Path:
    """Apply one baseline defense to the suspicious adapter; returns OUT (an adapter, or a model for quantize)."""
    from bdclean.pipeline.run import load_suspicious

    check_method(method)
    opts = opts or DefendOptions()
    adapter, out = Path(adapter), Path(out)
    _check_out(out, adapter)
    sus = load_suspicious(adapter, base)
    require(sus.kind == "adapter", f"{adapter}: not a PEFT LoRA adapter; the baseline defenses implement the "
                                   "adapter-only threat model")
    info, base_dir, base_cfg = sus.info, sus.base_dir, sus.model_cfg
    uses_data = "samples" in USES[method]
    config = {"method": method, "adapter": str(adapter), "base": str(base_dir),
              **opts.model_dump(include=set(USES[method]))}
    inputs = {"adapter": adapter_hash(adapter), "base": model_hash(base_dir)}
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
    if not config.get("augment", 1):  # off: the manifests of defenses made before the option existed stay valid
        config.pop("augment")
    from bdclean.train import device as dev

    if uses_data and dev.fingerprint_part(dev.current()) is not None:  # a fine-tune off CPU float32 (train/device.py)
        config["placement"] = dev.fingerprint_part(dev.current())
    man = Manifest("defend", config, inputs)
    if up_to_date(out, man.fingerprint, f"defend {method}", force):
        return out
    extra_rows, distill = None, None
    if prompts is not None:
        from bdclean.pipeline.restore import distill_targets

        extra_rows, distill = distill_targets(adapter, str(base_dir), prompts, restore_options(opts))
    ctx = {"adapter": adapter, "out": out, "info": info, "base_dir": base_dir, "base_cfg": base_cfg, "clean": clean,
           "extra_rows": extra_rows}
    man.extra = {"method": method, **_RUN[method](ctx, opts), "placement": dev.current().record()}
    if distill is not None:
        from bdclean.io.artifacts import write_jsonl
        from bdclean.pipeline.restore import DISTILL_FILE

        man.extra["distill"] = distill
        write_jsonl(out / DISTILL_FILE, extra_rows)
    outputs = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != C.MANIFEST)
    man.write(out, outputs)
    log(f"defend {method}: {'model' if method == 'quantize' else 'adapter'} → {out}")
    return out
