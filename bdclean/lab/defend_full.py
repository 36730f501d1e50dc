"""defend on a full checkpoint: the baselines of the full-model threat model (paper Table 2, full-model columns).

finetune    every weight fine-tuned on restore's clean samples / epochs, at the full-model lr (1e-5)
prune       zero the τ fraction (global) of MLP channels whose own weights (gate row j, up row j, down column j) have
            the smallest norm; no fine-tuning
fine-prune  zero, in each layer, the τ fraction of MLP channels most dormant on the clean samples by their Wanda score
            (Σ_i |W_down[i, j]| · ‖X_j‖₂, X = down_proj's input on those samples; core/score.py), then finetune
quantize    INT4 round-to-nearest every decoder Linear (and an untied lm_head), dequantized
crow        finetune with CROW's loss (lab/crow.py)
reset       only with ``--base``, the public model the checkpoint was fine-tuned from: the checkpoint's whole update
            discarded (θ = θ_base), then finetune — "fine-tune the base", the yardstick of the known-base route

τ defaults to the full-model signature's (5 %, config.DEFAULT_TAU), the ratio of our own cut. Every output is a full
HF model directory whose tokenizer and generation files come from the trusted tokenizer (io/tokenizers.py), never
from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from bdclean.errors import InputError, UsageError, require

FULL_METHODS = ("finetune", "prune", "fine-prune", "quantize", "crow", "reset")
# config.json fields that must agree for the named base's weights to stand in for the checkpoint's (reset)
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")
WANDA_SELECTION = "per layer, smallest structured Wanda score Σ_i |W_down[i,j]|·‖X_j‖₂ on the clean samples"
MAGNITUDE_SELECTION = "global, smallest ‖(gate row j, up row j, down column j)‖ of the weights"


def check_method(method: str, base: str | None) -> None:
    if method == "retrain":
        raise UsageError("retrain trains a fresh adapter; for a full checkpoint use `defend reset --base BASE` "
                         "(the base's weights, then the same fine-tune)")
    require(method in FULL_METHODS, f"{method} is not implemented for full checkpoints; choose one of "
                                    f"{', '.join(FULL_METHODS)}", UsageError)
    if method != "reset" and base is not None:
        raise UsageError(f"--base names the model a full checkpoint was fine-tuned from, which only reset uses; "
                         f"drop it for {method}")
    if method == "reset" and base is None:
        raise UsageError("reset of a full checkpoint needs --base, the model it was fine-tuned from: its weights "
                         "replace the checkpoint's before the fine-tune")


def check_same_shape(base_dir: Path, base_cfg: dict, model_cfg: dict, model: Path) -> None:
    for key in SHAPE_KEYS:
        if base_cfg.get(key) != model_cfg.get(key):
            raise InputError(f"{base_dir}: --base has {key} {base_cfg.get(key)!r}, the checkpoint {model} has "
                             f"{model_cfg.get(key)!r}; give the model it was fine-tuned from")


def _mlp(model, cfg: dict) -> list[dict]:
    from bdclean.core.arch import mlp_module_names

    return [{part: model.get_submodule(name) for part, name in layer.items()}
            for layer in mlp_module_names(cfg["model_type"], int(cfg["num_hidden_layers"]))]


def weight_channel_norms(model, cfg: dict):
    """[layers, I]: ‖(gate row j, up row j, down column j)‖ of the dense weights."""
    import torch

    rows = []
    with torch.no_grad():
        for m in _mlp(model, cfg):
            sq = (m["gate"].weight.double() ** 2).sum(1) + (m["up"].weight.double() ** 2).sum(1)
            rows.append((sq + (m["down"].weight.double() ** 2).sum(0)).sqrt())
    return torch.stack(rows)


def down_input_energy(model, tok, rows: list[dict], cfg: dict, max_len: int, batch_size: int):
    """[layers, I]: the sum of squares of each down_proj input channel over every real token of ``rows`` (prompt
    and response, padding excluded), from forward hooks; no gradients."""
    import torch

    from bdclean.train.chat import encode
    from bdclean.train.loop import collate

    mlp = _mlp(model, cfg)
    energy = torch.zeros(len(mlp), int(cfg["intermediate_size"]), dtype=torch.float64)
    state: dict = {}

    def hook(layer):
        def fn(_module, args):
            x = args[0].double()
            energy[layer] += ((x ** 2) * state["mask"].unsqueeze(-1)).sum((0, 1)).cpu()
        return fn

    handles = [m["down"].register_forward_pre_hook(hook(layer)) for layer, m in enumerate(mlp)]
    examples = [encode(tok, r, max_len) for r in rows]
    device = next(model.parameters()).device
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for s in range(0, len(examples), batch_size):
                ids, mask, _, _ = collate(examples[s:s + batch_size], tok.pad_token_id)
                state["mask"] = mask.to(device=device, dtype=torch.float64)
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return energy


def wanda_mask(model, tok, rows: list[dict], cfg: dict, tau: float, max_len: int, batch_size: int):
    """(mask [layers, I] of the ⌈τ·I⌉ most dormant channels of every layer, the scores)."""
    import torch

    from bdclean.core.score import select_top, wanda_channel_scores

    energy = down_input_energy(model, tok, rows, cfg, max_len, batch_size)
    scores = torch.stack([wanda_channel_scores(m["down"].weight.detach().cpu(), energy[layer])
                          for layer, m in enumerate(_mlp(model, cfg))])
    return select_top(-scores, tau, "per-layer"), scores


def zero_mask(model, cfg: dict, mask) -> int:
    """Zero the masked channels' gate/up rows and down columns in place; returns the tensors changed."""
    import torch

    from bdclean.core.masks import zero_channels

    changed = 0
    with torch.no_grad():
        for layer, m in enumerate(_mlp(model, cfg)):
            idx = mask[layer].nonzero().flatten()
            if idx.numel() == 0:
                continue
            for part in ("gate", "up", "down"):
                w = m[part].weight
                w.copy_(zero_channels(w.detach(), idx.to(w.device), part))
                changed += 1
    return changed


def _train(model, ctx: dict, opts, label: str, loss_fn=None) -> dict:
    from bdclean.train.finetune import finetune

    for p in model.parameters():
        p.requires_grad_(True)
    return finetune(model, ctx["tok"], ctx["clean"], opts, opts.lr, label, loss_fn, ctx["extra_rows"],
                    ctx["teacher"])


def _write(model, ctx: dict) -> None:
    from bdclean.io.artifacts import atomic_dir
    from bdclean.io.models import shard_size_like
    from bdclean.io.tokenizers import install

    with atomic_dir(ctx["out"], "defend") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=shard_size_like(ctx["model"]))
        # save_pretrained derives a generation_config.json from the checkpoint's config: install replaces it with
        # the trusted source's (or removes it), with the trusted tokenizer files
        install(ctx["tokenizer"].source, tmp)


def run_method(method: str, ctx: dict, opts, restore_opts) -> dict:
    """Apply one full-model baseline; writes ctx["out"] and returns the manifest's facts."""
    from bdclean.io.models import load_tokenizer
    from bdclean.train.device import load_placed

    cfg = ctx["cfg"]
    ctx = {**ctx, "tok": load_tokenizer(ctx["tokenizer"].source)}  # the trusted one, loaded once
    if method == "quantize":
        from bdclean.io.models import load_model
        from bdclean.lab.quant import quantize_decoder

        model = load_model(ctx["model"])  # float32: the grid is computed on the stored weights
        facts = quantize_decoder(model, opts.group_size)
        _write(model, ctx)
        return facts
    if method == "reset":
        model = load_placed(ctx["base_dir"])
        stats = _train(model, ctx, restore_opts, "defend reset")
        _write(model, ctx)
        return {"init": f"the base's weights ({ctx['base_dir']})", "kept_update_share_before_restore": {"all": 0.0},
                "train": stats}
    model = load_placed(ctx["model"])
    facts: dict = {}
    if method == "prune" or method == "fine-prune":
        if method == "prune":
            from bdclean.core.score import select_top

            norms = weight_channel_norms(model, cfg)
            mask, selection = select_top(-norms, opts.tau, "global"), MAGNITUDE_SELECTION
        else:
            from bdclean.train.finetune import clean_draw

            rows = clean_draw(ctx["clean"], restore_opts)  # the samples the fine-tune then trains on
            mask, _ = wanda_mask(model, ctx["tok"], rows, cfg, opts.tau, restore_opts.max_len,
                                 restore_opts.batch_size)
            selection = f"{WANDA_SELECTION} ({len(rows)} samples)"
        facts = {"selection": selection, "channels_pruned": int(mask.sum()), "channels_total": mask.numel(),
                 "tensors_changed": zero_mask(model, cfg, mask)}
    if method in ("finetune", "fine-prune"):
        facts["train"] = _train(model, ctx, restore_opts, f"defend {method}")
    elif method == "crow":
        from bdclean.lab.crow import crow_loss

        stats = _train(model, ctx, restore_opts, "defend crow", crow_loss(opts.crow_alpha, opts.crow_eps))
        facts["train"] = {**stats, "alpha": opts.crow_alpha, "eps": opts.crow_eps}
    _write(model, ctx)
    return facts


__all__ = ["FULL_METHODS", "check_method", "check_same_shape", "down_input_energy", "run_method", "wanda_mask",
           "weight_channel_norms", "zero_mask"]
