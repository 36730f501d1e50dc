"""extract: a full checkpoint that fine-tunes a known base → a PEFT LoRA adapter on that base.

Most checkpoints on a model hub are fine-tunes of a public base. When the user names it (``--base``), the
checkpoint's own update θ_sus − θ_base is what a backdoor lives in, and as an adapter it gets everything the
adapter threat model has: the signature's channel geometry, the adapter default (measured on the 11-cell grid) and
a true reset baseline (every entry of the update zeroed = the base). Each attention/MLP projection's update is
split by truncated SVD (core/extract.py); every other tensor (embeddings, norms, biases, lm_head) is dropped, so
the adapter runs on the base's own values there — its manifest lists each one that differed, with the size of the
change, and the share of the update's energy the rank kept.

The checkpoint is hostile input: read from safetensors only (headers first, then one tensor at a time), its
tokenizer, chat template and generation config never read; shapes and names must match the base's.
"""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.console import log, progress
from bdclean.errors import InputError, UsageError, require
from bdclean.io.artifacts import Manifest, load_manifest
from bdclean.io.fingerprints import model_hash
from bdclean.pipeline.folders import up_to_date

# config.json fields that must agree with the base for θ_sus − θ_base to mean anything
SAME_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
DROPPED_LISTED = 20  # changed tensors outside the projections named one by one in the manifest (the rest counted)


def _headers(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """name → (file, shape) over a model folder's safetensors files, from their headers (io/headers.py)."""
    from bdclean.io.headers import read_header
    from bdclean.io.models import model_weight_files

    return {k: (f, shape) for f in model_weight_files(model_dir) for k, (_, shape) in read_header(f).items()}


def _check_out(out: Path, checkpoint: Path, base_dir: Path) -> None:
    for what, p in (("checkpoint", checkpoint), ("base", base_dir)):
        o, q = out.resolve(), p.resolve()
        if o == q or q in o.parents or o in q.parents:
            raise UsageError(f"{out}: --out must lie outside the {what} folder {p}")
    if out.exists():
        require(out.is_dir(), f"{out}: exists and is not a directory", UsageError)
        man = load_manifest(out)
        if any(out.iterdir()) and (man is None or man.get("stage") != "extract"):
            raise UsageError(f"{out}: exists and is not an extract output; choose another --out")


def check_same_model(sus_cfg: dict, base_cfg: dict, checkpoint: Path, base_dir: Path) -> None:
    for k in SAME_FIELDS:
        a, b = sus_cfg.get(k), base_cfg.get(k)
        if a != b:
            raise InputError(f"{checkpoint}: config {k} {a!r} differs from the base's {b!r} ({base_dir}); "
                             "extract needs a fine-tune of exactly this base")


def projections(cfg: dict) -> list[str]:
    from bdclean.core.arch import attn_module_names, mlp_module_names

    n = int(cfg["num_hidden_layers"])
    mods = []
    for attn, mlp in zip(attn_module_names(cfg["model_type"], n), mlp_module_names(cfg["model_type"], n)):
        mods += [attn[k] for k in ("q", "k", "v", "o")] + [mlp[k] for k in ("gate", "up", "down")]
    return mods


def check(checkpoint: Path, base: str):
    """The checkpoint vetted as hostile input and checked against the base from the weight headers (nothing is
    loaded): (suspicious full checkpoint, base dir, base config, checkpoint headers, base headers). Also purify's
    and validate's preflight for `--extract`."""
    from bdclean.io.models import read_model_config, resolve_base
    from bdclean.pipeline.run import load_suspicious

    sus = load_suspicious(Path(checkpoint), None, full=True)
    base_dir = resolve_base(base)
    base_cfg = read_model_config(base_dir)
    check_same_model(sus.model_cfg, base_cfg, sus.path, base_dir)
    hs, hb = _headers(sus.path), _headers(base_dir)
    for k, (_, shape) in hb.items():
        if k not in hs:
            raise InputError(f"{sus.path}: tensor {k!r} of the base is missing; not a fine-tune of {base_dir}")
        if hs[k][1] != shape:
            raise InputError(f"{sus.path}: tensor {k!r} has shape {hs[k][1]}, the base's {shape}")
    missing = sorted({m + ".weight" for m in projections(base_cfg)} - set(hb))
    if missing:
        raise InputError(f"{base_dir}: no tensor {missing[0]!r}; its layout is not the {base_cfg['model_type']} "
                         "family's")
    return sus, base_dir, base_cfg, hs, hb


def run(checkpoint: Path, out: Path, base: str, rank: int = 64, force: bool = False) -> Path:
    import torch
    from safetensors import safe_open

    from bdclean.core.arch import peft_key
    from bdclean.core.extract import low_rank, relative_change
    from bdclean.io.peft_io import write_adapter

    require(rank >= 1, "--rank must be ≥ 1", UsageError)
    checkpoint, out = Path(checkpoint), Path(out)
    sus, base_dir, base_cfg, hs, hb = check(checkpoint, base)
    _check_out(out, checkpoint, base_dir)
    man = Manifest("extract", {"rank": rank, "checkpoint": str(checkpoint), "base": str(base_dir)},
                   {"checkpoint": model_hash(checkpoint), "base": model_hash(base_dir)})
    if up_to_date(out, man.fingerprint, "extract", force):
        return out
    extra_names = sorted(set(hs) - set(hb))
    targets = {m + ".weight" for m in projections(base_cfg)}
    tensors, kept, energy, dropped = {}, {}, {}, []
    handles: dict[Path, object] = {}

    def read(name: str, table) -> "torch.Tensor":
        f = table[name][0]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        t = handles[f].get_tensor(name).float()
        if not torch.isfinite(t).all():
            raise InputError(f"{f}: tensor {name!r} holds NaN or Inf values")
        return t

    names = sorted(hb)
    with progress() as bar:
        task = bar.add_task("extract: θ_checkpoint − θ_base", total=len(names))
        for name in names:
            new, old = read(name, hs), read(name, hb)
            if name in targets:
                A, B, share = low_rank(new - old, rank)
                mod = name[: -len(".weight")]
                tensors[f"{peft_key(mod)}.lora_A.weight"] = A.contiguous()
                tensors[f"{peft_key(mod)}.lora_B.weight"] = B.contiguous()
                sq = float(((new - old).double() ** 2).sum())
                kept[mod], energy[mod] = share, sq
            elif not torch.equal(new, old):
                dropped.append({"tensor": name, "relative_change": relative_change(new, old)})
            bar.update(task, advance=1)
    handles.clear()
    total = sum(energy.values())
    share = sum(kept[m] * energy[m] for m in kept) / total if total > 0 else 1.0
    short = sorted({m.rsplit(".", 1)[-1] for m in kept})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
           "bias": "none", "target_modules": short, "base_model_name_or_path": str(base_dir),
           "inference_mode": True}
    dropped.sort(key=lambda d: -d["relative_change"])
    man.extra = {"modules": len(kept), "kept_energy_share": share,
                 "min_module_kept_energy_share": min(kept.values()) if kept else None,
                 "zero_update_modules": sum(1 for m in energy if energy[m] == 0.0),
                 "dropped_changed_tensors": len(dropped), "dropped": dropped[:DROPPED_LISTED],
                 "checkpoint_only_tensors": extra_names[:DROPPED_LISTED],
                 "checkpoint_only_tensor_count": len(extra_names)}
    write_adapter(out, cfg, tensors, stage="extract")
    man.write(out, [C.ADAPTER_CONFIG, C.ADAPTER_WEIGHTS])
    log(f"extract: {len(kept)} projections at rank {rank} keep {share:.1%} of the update's energy → {out}")
    if dropped:
        top = ", ".join(f"{d['tensor']!r} ({d['relative_change']:.2%})" for d in dropped[:3])
        log(f"extract: {len(dropped)} other changed tensor(s) dropped (the adapter uses the base's): {top}"
            + (" …" if len(dropped) > 3 else ""))
    if extra_names:
        log(f"extract: {len(extra_names)} tensor(s) only in the checkpoint ignored, e.g. {extra_names[0]!r}")
    return out

