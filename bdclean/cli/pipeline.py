"""The pipeline's commands: make-variants, train-pairs, diff, score, suppress, restore, purify, extract, validate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bdclean.cli import flags as F
from bdclean.cli.base import BASE, CONFIG, FORCE, OUT, app, guarded, nonempty_name, nonempty_path, placed
from bdclean.cli.flags import config_flags
from bdclean.pipeline.run import Run  # light: no torch, no transformers


def _purify_config(config: Optional[Path], overrides: dict):
    """PurifyConfig from the YAML with the command's flags on top (CLI > YAML > defaults)."""
    from bdclean.config import PurifyConfig, build, load_yaml

    return build(PurifyConfig, load_yaml(config), overrides, where=str(config or "options"))


def _placed(cfg):
    """The placement of a command that takes purify's config (CLI > YAML > auto), resolved before any work."""
    return placed(cfg.device, cfg.dtype, cfg.gradient_checkpointing)


@app.command("make-variants")
@guarded
@config_flags(F.CLEAN, F.N_VARIANTS, F.VARIANT_SAMPLES, F.flag("variants.seed", "--seed", type=int))
def make_variants(out: Path = OUT, overrides: dict = None, config: Optional[Path] = CONFIG, force: bool = FORCE):
    """Build N synthetic backdoor variants (clean subset, key, behavior).

    Example: bdclean make-variants --clean alpaca.jsonl --out runs/x -n 6
    """
    from bdclean.pipeline import variants

    cfg = _purify_config(config, overrides)
    variants.run(cfg.clean, out, cfg.variants, force)


@app.command("train-pairs")
@guarded
@config_flags(F.BASE, F.EPOCHS, F.LR, F.BATCH_SIZE, F.MAX_LEN, F.WORKERS, F.EXECUTOR, F.RAY_ADDRESS, F.FULL,
              F.VARIANT_TRAINING, F.FULL_LR,
              F.TOKENIZER, F.ACCEPT_TOKENIZER, *F.PLACEMENT)
def train_pairs(
    adapter: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory or full HF model directory"),
    out: Path = OUT,
    overrides: dict = None,
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Fine-tune a backdoored and a clean twin of the suspicious adapter for every variant (resumable).

    Example: bdclean train-pairs suspicious_adapter/ --out runs/x
    """
    from bdclean.pipeline import pairs

    cfg = _purify_config(config, overrides)
    with _placed(cfg):
        pairs.run(Run.open(adapter, out, cfg.base, True if cfg.full else None), cfg.pairs, force, cfg.tokenizer,
                  cfg.accept_tokenizer)


@app.command("diff")
@guarded
def diff_cmd(out: Path = OUT, force: bool = FORCE):
    """Per-channel deltas Δᵢ = θᵢᵇᵈ − θᵢᶜˡᵉᵃⁿ of every pair, stored as per-channel Gram matrices.

    Example: bdclean diff --out runs/x
    """
    from bdclean.pipeline import diff

    diff.run(Run.load(out), force)


@app.command("score")
@guarded
@config_flags(F.TAU, F.TARGET_ASR, F.TARGET_REMOVAL, F.MAX_PPL_INCREASE, F.LAMBDA, F.SCORE, F.NORM_SCALE, F.HEADS)
def score_cmd(
    out: Path = OUT,
    overrides: dict = None,
    per_layer: Optional[bool] = typer.Option(None, "--per-layer/--global", help=F.describe("score.scope")),
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Score channels and write the backdoor signature (signature.json + scores.safetensors).

    Example: bdclean score --out runs/x --tau 0.3
    """
    from bdclean.pipeline import score as score_stage

    scope = None if per_layer is None else ("per-layer" if per_layer else "global")
    cfg = _purify_config(config, {**overrides, "score.scope": scope})
    score_stage.run(Run.load(out), cfg.score, force)


@app.command("suppress")
@guarded
def suppress_cmd(
    adapter: Path = typer.Argument(..., help="the suspicious adapter (or full model) the signature was computed for"),
    out: Path = OUT,
    base: Optional[str] = BASE,
    method: str = typer.Option("channels", "--method", help="channels: zero the signature's channels and units "
                               "(the paper); directions (experimental): project the variants' shared backdoor "
                               "subspace out of every LoRA module (an adapter) or every weight the variants train "
                               "(a full checkpoint), no signature needed"),
    side: str = typer.Option("both", "--side", help="directions: out | in | both sides of each module"),
    k: int = typer.Option(8, "--k", help="directions: most directions removed per module and side"),
    min_share: float = typer.Option(0.2, "--min-share", help="directions: remove an eigen-direction of the "
                                    "variants' mean normalised delta only if its eigenvalue (0-1) is at least this"),
    force: bool = FORCE,
):
    """Zero the signature channels' LoRA entries (lora_B rows of gate/up, lora_A columns of down); on a full
    checkpoint, re-initialise their weights.

    Example: bdclean suppress suspicious_adapter/ --out runs/x

    Example: bdclean suppress suspicious_adapter/ --out runs/x --method directions --k 8 --min-share 0.2

    Example: bdclean suppress suspicious_checkpoint/ --out runs/x --method directions --side out --k 4
    """
    from bdclean.errors import UsageError, at_least

    if method == "directions":
        from bdclean.pipeline import directions

        at_least("--k", k, 1)
        if not 0 <= min_share <= 1:
            raise UsageError(f"--min-share must lie in [0, 1], not {min_share}")
        directions.run(Run.load(out, adapter, base), side, k, min_share, force)
        return
    if method != "channels":
        raise UsageError(f"--method must be channels | directions, not {method!r}")
    from bdclean.pipeline import suppress

    suppress.run(Run.load(out, adapter, base), force)


@app.command("restore")
@guarded
@config_flags(F.CLEAN, F.RESTORE_SAMPLES, F.RESTORE_EPOCHS, F.RESTORE_LR, F.PROMPTS, F.AUGMENT, F.SELF_DISTILL,
              F.ADVERSARIAL, F.ADV_LAYER, F.ADV_STEPS, F.ADV_TARGET, *F.PLACEMENT)
def restore_cmd(out: Path = OUT, overrides: dict = None, config: Optional[Path] = CONFIG, force: bool = FORCE):
    """Light clean fine-tune of the suppressed model; writes OUT/purified (a PEFT adapter, or a full HF model
    directory in full-model mode).

    Example: bdclean restore --out runs/x --clean alpaca.jsonl
    """
    from bdclean.pipeline import restore
    from bdclean.pipeline.folders import check_out_inputs

    cfg = _purify_config(config, overrides)
    with _placed(cfg):
        check_out_inputs(out, ("restore",), clean=cfg.clean)
        restore.run(Run.load(out), cfg.clean, cfg.restore, force, cfg.prompts)


@app.command("purify")
@guarded
@config_flags(*F.PURIFY)
def purify_cmd(
    adapter: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory or full HF model directory"),
    out: Path = OUT,
    overrides: dict = None,
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Run every stage; finished, unchanged stages are skipped. Leaves OUT/purified (a PEFT adapter, or a full HF
    model directory for a full checkpoint). A full checkpoint without --extract is experimental: that mode broke
    every SmolLM2 checkpoint measured; with its public base named (--base B --extract 64) it is purified as an
    adapter.

    Example: bdclean purify suspicious_adapter/ --clean alpaca.jsonl --out runs/x

    Example: bdclean purify suspicious_adapter/ --clean alpaca.jsonl --prompts my_inputs.jsonl --out runs/x

    Example: bdclean purify hub_checkpoint/ --base smollm2 --extract 64 --merge --out runs/x
    """
    from bdclean.pipeline import purify

    cfg = _purify_config(config, overrides)
    with _placed(cfg):
        purify.run(adapter, out, cfg, force)


@app.command("extract")
@guarded
def extract_cmd(
    checkpoint: Path = typer.Argument(..., help="full HF checkpoint that fine-tunes --base (safetensors)"),
    out: Path = typer.Option(..., "--out", "-o", parser=nonempty_path, metavar="<path>",
                             help="adapter folder to write"),
    base: str = typer.Option(..., "--base", parser=nonempty_name, help="the public base the checkpoint was fine-tuned "
                             "from: an HF model directory or 'smollm2'"),
    rank: int = typer.Option(64, "--rank", min=1, help="LoRA rank of each projection's update (truncated SVD)"),
    force: bool = FORCE,
):
    """A full checkpoint's own update over a known base (θ_checkpoint − θ_base) as a PEFT LoRA adapter on that base,
    so the adapter threat model applies: its signature, its defaults, and a true reset (the base). Embeddings,
    norms and biases are dropped (the base's are used); the manifest lists each that changed and the share of the
    update the rank keeps.

    Example: bdclean extract hub_checkpoint/ --base smollm2 --out runs/x-adapter

    Then: bdclean purify runs/x-adapter --base smollm2 --out runs/x (or both in one: bdclean purify hub_checkpoint/
    --base smollm2 --extract 64 --out runs/x)
    """
    from bdclean.pipeline import extract

    extract.run(checkpoint, out, base, rank, force)
    typer.echo(str(out))


@app.command("validate")
@guarded
@config_flags(*F.PURIFY)
def validate_cmd(
    model: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory or full HF model directory"),
    overrides: dict = None,
    config: Optional[Path] = CONFIG,
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=nonempty_path, metavar="<path>",
                                       help="accepted so that "
                                       "a purify command line can be checked as typed: the run folder is checked "
                                       "as purify would (it is not written)"),
    force: bool = typer.Option(False, "--force", help="accepted as purify takes it (nothing is computed)"),
):
    """Run purify's checks without training anything; print a JSON summary (exit 0) or one error line.

    Takes purify's options and --config, so `bdclean purify ARGS` can be checked as `bdclean validate ARGS`: the
    model as purify reads it (safetensors only, no pickles or remote code, only LoRA factors of MLP and attention
    projections, every declared size against the weight headers and the base, finite values), every option value,
    the memory it needs and the clean data.

    Example: bdclean validate suspicious_adapter/ --clean alpaca.jsonl --config purify.yaml --heads 0.5
    """
    import json

    from bdclean.console import log
    from bdclean.io.headers import gib
    from bdclean.pipeline import validate

    cfg = _purify_config(config, overrides)
    with _placed(cfg) as where:  # checked as purify would, nothing placed
        summary = validate.run(model, cfg, out)
    summary["placement"] = {"device": where.device, "dtype": where.dtype,
                            "gradient_checkpointing": where.gradient_checkpointing}
    typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    what = (f"LoRA adapter, {summary['lora']['modules']} modules in {len(summary['lora']['layers'])} layers"
            if summary["kind"] == "adapter" else "full checkpoint"
            + (f" of {summary['base']} (extracted at rank {cfg.extract} first)" if cfg.extract else ""))
    mem = summary["memory"]
    avail = "unknown" if mem["available_bytes"] is None else gib(mem["available_bytes"])
    log(f"validate: memory about {gib(mem['estimate_bytes'])} per training process (at least "
        f"{gib(mem['floor_bytes'])}; {avail} available now)")
    log(f"validate: {model} is a valid {what}; purify can start")
