"""suppress: remove the signature channels from the suspicious model.

adapter-only: zero their LoRA entries (the adapter's change to each channel becomes exactly zero).
full-model: re-initialise their weights (gate/up rows, down columns) with normal(0, initializer_range), seeded,
streaming one safetensors shard at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

from bdclean import constants as C
from bdclean.console import log
from bdclean.errors import BdcleanError, require
from bdclean.io.artifacts import Manifest, atomic_dir, load_manifest, stage_fingerprint
from bdclean.pipeline.folders import check_out_inputs, up_to_date
from bdclean.pipeline.run import Run

REINIT_SEED = 0x5EED


def rewrite_checkpoint(src: Path, dst_folder: Path, tokenizer: Path, edit) -> None:
    """Write ``dst_folder`` (atomically, as the suppress stage's output): the checkpoint ``src`` with every tensor
    passed through ``edit(key, tensor) -> tensor``, one safetensors shard at a time, shard names and index kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bdclean.io.models import model_weight_files
    from bdclean.io.tokenizers import install

    with atomic_dir(dst_folder, "suppress") as tmp:
        # from the checkpoint only what the weights need: its config and shard index. Its tokenizer, chat template
        # and generation config could carry a trigger, and any other file would pass through unvetted: the
        # tokenizer files come from the trusted source instead (io/tokenizers.py)
        for name in (C.MODEL_CONFIG, C.SAFETENSORS_INDEX):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        install(tokenizer, tmp)
        for shard in model_weight_files(src):
            with safe_open(str(shard), framework="pt") as fh:
                tensors = {key: edit(key, fh.get_tensor(key)).contiguous() for key in fh.keys()}
            # transformers' one key; the checkpoint's own header metadata is not carried over
            save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
            del tensors


def _suppress_full(src: Path, dst_folder: Path, mask, model_cfg: dict, seed: int, units=(),
                   tokenizer: Path | None = None) -> dict:
    import torch

    from bdclean.core.arch import mlp_module_names
    from bdclean.core.masks import reinit_channels

    std = float(model_cfg.get("initializer_range", 0.02))
    targets = {}
    for layer, names in enumerate(mlp_module_names(model_cfg["model_type"], mask.shape[0])):
        for part, name in names.items():
            targets[name + ".weight"] = (layer, part)
    from bdclean.core.arch import attn_module_names, head_geometry
    from bdclean.core.channels import head_slices
    from bdclean.core.masks import reinit_heads

    n_q, n_kv, hd = head_geometry(model_cfg)
    attn = attn_module_names(model_cfg["model_type"], mask.shape[0])
    head_targets: dict[str, list[tuple[int, int, str]]] = {}
    for layer, g in units:
        for part, name in attn[layer].items():
            head_targets.setdefault(name + ".weight", []).append((layer, g, part))
    require(tokenizer is not None, "internal error: a full checkpoint is suppressed without a trusted tokenizer",
            BdcleanError)
    changed = 0

    def edit(key: str, t):
        nonlocal changed
        if key in targets:
            layer, part = targets[key]
            idx = mask[layer].nonzero().flatten()
            g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 3 + ("gate", "up", "down").index(part))
            t = reinit_channels(t, idx, part, std, g)
            changed += 1
        for layer, unit, part in head_targets.get(key, []):
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (layer + 1) + unit * 4 + "qkvo".index(part))
            t = reinit_heads(t, head_slices(unit, n_q, n_kv, hd)[part], part, std, g)
            changed += 1
        return t

    rewrite_checkpoint(src, dst_folder, tokenizer, edit)
    return {"init_std": std, "tensors_changed": changed}


def _recorded_tokenizer(pman: dict, pfolder: Path) -> Path:
    """The trusted tokenizer train-pairs used for a full checkpoint, unchanged since."""
    from bdclean.io.tokenizers import tokenizer_digest

    path = (pman.get("extra", {}).get("paths") or {}).get("tokenizer")
    if not path or "tokenizer" not in pman.get("inputs", {}):
        raise BdcleanError(f"{pfolder}: made before bdclean took a full checkpoint's tokenizer from a trusted source; "
                           "rerun `bdclean train-pairs --force` (with --tokenizer DIR)")
    if not Path(path).is_dir() or tokenizer_digest(Path(path)) != pman["inputs"]["tokenizer"]:
        raise BdcleanError(f"{path}: the trusted tokenizer train-pairs used is missing or changed since; rerun "
                           "`bdclean train-pairs`")
    return Path(path)


MOSTLY_REMOVED = 0.25  # below this kept share of the adapter's update, say that purifying ≈ discarding the adapter


def kept_update(info, after: dict, mlp_keys: set[str]) -> dict[str, float]:
    """Share of the adapter's weight update ‖ΔW‖²_F (summed over its LoRA modules, with their scaling) that is left
    in ``after`` (its suppressed tensors): overall, in the MLP modules and in the others (attention)."""
    from bdclean.core.channels import LowRank

    sums = {"all": [0.0, 0.0], "mlp": [0.0, 0.0], "attention": [0.0, 0.0]}
    for mod, (ka, kb) in info.module_pairs().items():
        s = info.scaling(mod, info.tensors[ka].shape[0])
        for i, t in enumerate((info.tensors, after)):
            e = LowRank(t[kb].double() * s, t[ka].double()).frobenius_sq()
            sums["all"][i] += e
            sums["mlp" if mod in mlp_keys else "attention"][i] += e
    return {k: round(a / b, 4) for k, (b, a) in sums.items() if b > 0}


def run(run: Run, force: bool = False) -> Path:
    from safetensors.torch import load_file

    from bdclean.core.arch import mlp_module_names, peft_key
    from bdclean.core.masks import suppress_lora_channels
    from bdclean.io.peft_io import write_adapter

    out = run.out
    sfolder, pfolder, folder = run.folder("score"), run.folder("train-pairs"), run.folder("suppress")
    pman = load_manifest(pfolder)
    if pman is None:
        raise BdcleanError(f"{pfolder}: no train-pairs output; run `bdclean train-pairs` first")
    sus = run.suspicious()
    check_out_inputs(out, ("suppress",), sus.path, sus.base_dir)
    run.check_recorded()
    digest = run.digest()
    inputs = {"score": stage_fingerprint(sfolder, "score"), "adapter": digest}
    tokenizer = None
    if sus.kind == "full":
        tokenizer = _recorded_tokenizer(pman, pfolder)
        inputs["tokenizer"] = pman["inputs"]["tokenizer"]
    man = Manifest("suppress", {"mode": sus.kind, "reinit_seed": REINIT_SEED}, inputs)
    if up_to_date(folder, man.fingerprint, "suppress", force):
        return folder
    scores = load_file(str(sfolder / C.SCORES))
    mask = scores["mask"].bool()
    units = [tuple(u) for u in scores["head_mask"].bool().nonzero().tolist()] if "head_mask" in scores else []
    if sus.kind == "full":
        man.extra = {"channels_reinitialised": int(mask.sum()), "heads_reinitialised": len(units),
                     "tokenizer": pman["config"].get("tokenizer"),
                     **_suppress_full(sus.path, folder, mask, sus.model_cfg, REINIT_SEED, units, tokenizer)}
        outputs = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != C.MANIFEST)
        man.write(folder, outputs)
        log(f"suppress: re-initialised {int(mask.sum())} channels (normal(0, {man.extra['init_std']})) → {folder}")
        return folder
    modules = [{k: peft_key(v) for k, v in names.items()}
               for names in mlp_module_names(sus.model_cfg["model_type"], mask.shape[0])]
    tensors, changed = suppress_lora_channels(sus.info.tensors, mask, modules)
    if units:
        from bdclean.core.arch import attn_module_names, head_geometry
        from bdclean.core.masks import suppress_lora_heads

        attn = [{k: peft_key(v) for k, v in names.items()}
                for names in attn_module_names(sus.model_cfg["model_type"], mask.shape[0])]
        tensors, hchanged = suppress_lora_heads(tensors, units, attn, *head_geometry(sus.model_cfg))
        changed += hchanged
    write_adapter(folder, sus.info.config, tensors, stage="suppress")
    kept = kept_update(sus.info, tensors, {m[p] for m in modules for p in m})
    man.extra = {"channels_suppressed": int(mask.sum()), "heads_suppressed": len(units), "tensors_changed": changed,
                 "kept_update_share": kept}
    man.write(folder, [C.ADAPTER_CONFIG, C.ADAPTER_WEIGHTS])
    parts = ", ".join(f"{k} {v:.0%}" for k, v in kept.items() if k != "all")
    log(f"suppress: zeroed {int(mask.sum())} channels and {len(units)} attention units in {changed} LoRA tensors; "
        f"the adapter keeps {kept.get('all', 0):.0%} of its weight update ‖ΔW‖² ({parts}) → {folder}")
    if kept.get("all", 1.0) < MOSTLY_REMOVED:
        log("suppress: the signature takes most of the adapter: purifying it is close to discarding it and "
            "fine-tuning, so skills the restore data lacks may be lost (RESULTS.md, 'Skill retention')", style="yellow")
    return folder

