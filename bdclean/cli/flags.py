"""CLI flags generated from the options models (bdclean/config.py; the lab's ImplantOptions, EvalOptions and
DefendOptions), so a flag's help and default have one source.

A command declares the config fields it exposes as `Flag`s; `config_flags` adds them to the command's signature
(typer reads ``__signature__``) and hands the command one dict ``overrides`` {config path: value or None}, which
`config.build` applies over the YAML (CLI > YAML > defaults). Help text = the field's description, plus its default
when the description does not state one. purify and validate take the same list, so validate checks a purify command
line as typed.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import typer


@dataclass(frozen=True)
class Flag:
    name: str  # the command's parameter name
    decls: tuple[str, ...]  # "--n-variants", "-n"
    fields: tuple[str, ...]  # config paths it sets (`--seed` sets three)
    type: Any  # the CLI type (str for fields that take a number or a word, e.g. --tau 0.3 | auto)
    help: str | None = None  # None: the first field's description
    extra: dict = field(default_factory=dict)  # more typer.Option keywords (parser, min, metavar)
    model: type | None = None  # the options model the fields belong to (None: PurifyConfig)


def field_info(path: str, model: type | None = None):
    """The pydantic FieldInfo of a dotted config path (e.g. "pairs.epochs", "score.lambda")."""
    from bdclean.config import PurifyConfig

    model = model or PurifyConfig
    *parents, leaf = path.split(".")
    for p in parents:
        model = model.model_fields[p].annotation
    fields = model.model_fields
    by_alias = {f.alias: n for n, f in fields.items() if f.alias}
    return fields[by_alias.get(leaf, leaf)]


def describe(path: str, model: type | None = None) -> str:
    """A field's description with its default appended unless the description already states it."""
    info = field_info(path, model)
    text = info.description or ""
    default = info.get_default(call_default_factory=True)
    if default is not None and "default" not in text.lower():
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
        text += f" (default {shown:g})" if isinstance(shown, float) else f" (default {shown})"
    return text.replace("[", "\\[")  # rich markup in typer's help: '[ray]' would vanish


def flag(path: str | tuple[str, ...], *decls: str, type: Any = str, name: str | None = None,
         help: str | None = None, model: type | None = None, **extra) -> Flag:
    paths = (path,) if isinstance(path, str) else tuple(path)
    name = name or decls[0].lstrip("-").split("/")[0].replace("-", "_")
    return Flag(name, decls, paths, type, help, extra, model)


def model_flags(model: type, extra: dict[str, dict] | None = None, skip: tuple[str, ...] = ()) -> tuple[Flag, ...]:
    """One flag per field of a flat options model (but ``skip``): ``--field-name``, typed as the field
    (``X | None`` → X)."""
    import typing

    out = []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
        cli_type = args[0] if args else info.annotation
        out.append(flag(name, "--" + name.replace("_", "-"), type=cli_type, model=model,
                        **(extra or {}).get(name, {})))
    return tuple(out)


def option(f: Flag):
    return typer.Option(None, *f.decls, help=f.help or describe(f.fields[0], f.model), **f.extra)


def config_flags(*flags: Flag) -> Callable:
    """Decorator: ``flags`` become keyword parameters of the command, inserted where its ``overrides`` parameter
    is; the command receives them as ``overrides`` {config path: value}."""

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        if "overrides" not in sig.parameters:
            raise TypeError(f"{fn.__name__}: config_flags needs an `overrides` parameter")

        @functools.wraps(fn)
        def wrapper(*a, **k):
            ov: dict[str, Any] = {}
            for f in flags:
                v = k.pop(f.name, None)
                for p in f.fields:
                    ov[p] = v
            return fn(*a, overrides=ov, **k)

        params = []
        for p in sig.parameters.values():
            if p.name == "overrides":
                params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option(f),
                                             annotation=Optional[f.type]) for f in flags]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.default is not p.empty else p)
        del wrapper.__wrapped__  # typer must read the new signature, not fn's
        wrapper.__signature__ = sig.replace(parameters=params)
        # evaluated types, not the strings of `from __future__ import annotations`: typer resolves hints in the
        # wrapper's module, which lacks the command module's names
        wrapper.__annotations__ = {p.name: p.annotation for p in params if p.annotation is not p.empty}
        return wrapper

    return deco


# --- the flags, by config field ----------------------------------------------------------------------------------

def _name(value: str) -> str:
    from bdclean.cli.base import nonempty_name

    return nonempty_name(value)


CLEAN = flag("clean", "--clean")
BASE = flag("base", "--base", parser=_name)
FULL = flag("full", "--full", type=bool)
PROMPTS = flag("prompts", "--prompts", help=describe("prompts") + "; use trigger-free inputs (RESULTS.md, "
               "'Selective purification')")
TOKENIZER = flag("tokenizer", "--tokenizer", parser=_name)
ACCEPT_TOKENIZER = flag("accept_tokenizer", "--accept-tokenizer", type=bool)
EXTRACT = flag("extract", "--extract", type=int, min=1, metavar="RANK")
MERGE = flag("merge", "--merge", type=bool)
DEVICE = flag("device", "--device")
DTYPE = flag("dtype", "--dtype")
GRADIENT_CHECKPOINTING = flag("gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing",
                              type=bool)
PLACEMENT = (DEVICE, DTYPE, GRADIENT_CHECKPOINTING)

N_VARIANTS = flag("variants.n_variants", "--n-variants", "-n", type=int)
VARIANT_SAMPLES = flag("variants.samples", "--samples", type=int)

EPOCHS = flag("pairs.epochs", "--epochs", type=int)
LR = flag("pairs.lr", "--lr", type=float)
BATCH_SIZE = flag("pairs.batch_size", "--batch-size", type=int)
MAX_LEN = flag("pairs.max_len", "--max-len", type=int)
WORKERS = flag("pairs.workers", "--workers", type=int)
EXECUTOR = flag("pairs.executor", "--executor")
RAY_ADDRESS = flag("pairs.ray_address", "--ray-address")
VARIANT_TRAINING = flag("pairs.variant_training", "--variant-training")
FULL_LR = flag("pairs.full_lr", "--full-lr", type=float)

TAU = flag("score.tau", "--tau")
LAMBDA = flag("score.lambda", "--lambda", type=float, name="lam")
HEADS = flag("score.heads", "--heads")
SCORE = flag("score.score", "--score")
TARGET_ASR = flag("score.target_asr", "--target-asr", type=float)
TARGET_REMOVAL = flag("score.target_removal", "--target-removal", type=float)
MAX_PPL_INCREASE = flag("score.max_ppl_increase", "--max-ppl-increase", type=float)
NORM_SCALE = flag("score.norm_scale", "--norm-scale")

RESTORE_SAMPLES = flag("restore.samples", "--samples", type=int)
RESTORE_EPOCHS = flag("restore.epochs", "--epochs", type=int)
RESTORE_LR = flag("restore.lr", "--lr", type=float)
AUGMENT = flag("restore.augment", "--augment", type=float, help=describe("restore.augment")
               + "; RESULTS.md, 'Selective purification'")
SELF_DISTILL = flag("restore.self_distill", "--self-distill", type=float, help=describe("restore.self_distill")
                    + "; check triggered ASR after it (RESULTS.md)")
ADVERSARIAL = flag("restore.adversarial", "--adversarial", type=float, help=describe("restore.adversarial")
                   + "; RESULTS.md")
ADV_LAYER = flag("restore.adv_layer", "--adv-layer", type=int)
ADV_STEPS = flag("restore.adv_steps", "--adv-steps", type=int)
ADV_TARGET = flag("restore.adv_target", "--adv-target")

SEED = flag(("variants.seed", "pairs.seed", "restore.seed"), "--seed", type=int,
            help="seed of the variants, the twins and restore (default 0); the τ-auto probes and the full-model "
                 "re-initialisation use fixed seeds")

# purify's flags, and validate's (a purify command line is checked as typed)
PURIFY = (CLEAN, BASE, N_VARIANTS, VARIANT_SAMPLES, TAU, LAMBDA, HEADS, SCORE, SEED, WORKERS, EXECUTOR, RAY_ADDRESS,
          FULL, VARIANT_TRAINING, FULL_LR, PROMPTS, AUGMENT, SELF_DISTILL, ADVERSARIAL, ADV_LAYER, ADV_STEPS, ADV_TARGET, EXTRACT, MERGE, TOKENIZER, ACCEPT_TOKENIZER, *PLACEMENT)
