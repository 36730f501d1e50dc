"""The JSON artifacts bdclean writes and reads back, described as code: signature.json and tau_selection.json
(score), eval.json (eval), compare.json (compare), purify.json (purify), and the benchmark cells bench/grid.py and
bench/skill.py write (GridCell, SkillCell).

Each carries ``schema_version`` (an int; files from before it have none and read as version 0, whose keys are the
same). A writer builds its dict, passes it through :func:`checked` (cheap: pydantic validates the dict, a key the
model does not describe is an internal error) and writes the dict itself, so key order and bytes stay as they were
but for the version. A reader calls :func:`read` and gets the model back: attributes, not literal key paths. A file
from a newer bdclean (a version above the one here) fails with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bdclean.errors import BdcleanError, InputError


class _Artifact(BaseModel):
    # allow: a reader keeps working on a file with a key it does not know (an older or hand-edited file); writers
    # are held to the documented keys by checked()
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    # the version this bdclean writes and the highest it reads; per artifact, bumped on an incompatible change
    SCHEMA_VERSION: ClassVar[int] = 1
    schema_version: int = 0  # missing in files written before the key existed: version 0, the same keys as 1


# ----------------------------------------------------------------------------------------------------- signature


class SignatureChannel(BaseModel):
    model_config = ConfigDict(extra="allow")

    layer: int  # decoder layer index
    channel: int  # MLP intermediate channel index in that layer
    score: float  # the ranking score s_j (signature.json's "score" names its kind)
    norm: float  # mean ‖Δ_{i,j}‖ over the variants
    align: float  # mean positive cosine between the variants' deltas


class SignatureHead(BaseModel):
    model_config = ConfigDict(extra="allow")

    layer: int  # decoder layer index
    kv_head: int  # key/value head; the unit is this kv head with the query heads that share it
    query_heads: list[int]  # the query heads of the unit
    score: float
    norm: float
    align: float


class Signature(_Artifact):
    """score/signature.json: the backdoor signature (the channels and attention units suppress removes)."""

    tau: float  # fraction of MLP channels suppressed
    tau_selection: Literal["auto", "fixed"] = "fixed"  # auto: every measurement is in tau_selection.json
    lam: float = Field(alias="lambda")  # weight of the alignment term
    n_variants: int  # N, the variant pairs trained
    scope: str  # "global" (top τ of all channels) or "per-layer"
    score: str  # combined | norm | align | projection
    norm_scale: str = "none"  # "none" = the paper's raw norm; "median" = norm / median norm of the layer
    layers: int  # decoder layers
    channels_per_layer: int  # MLP intermediate size
    n_selected: int  # channels in the signature
    per_layer_counts: list[int]  # signature channels per layer
    channels: list[SignatureChannel]  # the signature's channels, highest score first
    heads: list[SignatureHead] = []  # the signature's attention units, highest score first (none: --heads 0)


# ---------------------------------------------------------------------------------------------------------- eval


class AsrResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    asr: float  # share of outputs the keyword rule counts as the backdoor's behaviour (NaN for no prompts)
    n: int | None = None  # prompts generated (the counts may be missing in a hand-made file)
    successes: int | None = None  # outputs counted
    empty: int | None = None  # empty outputs (never counted)


class McResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    acc: float  # lm-eval accuracy
    acc_norm: float | None = None  # length-normalised accuracy
    n: int | None = None  # questions


class Eval(_Artifact):
    """eval.json (`bdclean eval --out`): attack success rates, perplexity, skill and multiple-choice accuracy.
    Readers need only the figures: the description of the run may be missing (older or hand-made files)."""

    model: str | None = None  # what was evaluated (adapter or full model dir)
    kind: str | None = None  # "adapter" or "full"
    task: str | None = None  # which keyword rule
    rule: dict[str, Any] | None = None  # keywords and whether success means any/none present; empty outputs never count
    decoding: dict[str, Any] | None = None  # {"greedy": true, "max_new_tokens": n}
    inputs: dict[str, Any] | None = None  # the test files and their sha256
    environment: dict[str, str] | None = None  # library versions
    triggered: AsrResult | None = None  # ASR on prompts carrying the trigger (absent without --triggered)
    clean: AsrResult | None = None  # false-trigger rate on clean prompts (absent without --clean)
    skill: dict[str, Any] | None = None  # --skill: lab.skills.skill_metrics (its "score" is the headline)
    perplexity: float | None = None  # of reference responses on clean prompts (response tokens only)
    perplexity_tokens: int | None = None  # tokens behind the perplexity
    perplexity_references: str | None = None  # "clean" (the --clean file's outputs) or the --reference file
    generations: dict[str, list[dict[str, Any]]] = {}  # every prompt with its output and whether it counted
    mc: dict[str, McResult] | None = None  # --mc: per lm-eval task
    seconds: float | None = None  # wall time of the evaluation
    generation_s_per_100_prompts: float | None = None
    placement: dict[str, Any] | None = None  # device, dtype, torch (and CUDA) versions (train.device.Placement)

    def mc_mean(self) -> float | None:
        """Mean accuracy over the multiple-choice tasks, or None without any."""
        accs = [r.acc for r in (self.mc or {}).values()]
        return sum(accs) / len(accs) if accs else None


# -------------------------------------------------------------------------------------------------- tau selection


class TauRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    tau: float  # 0 = the unsuppressed backdoored twin
    asr: float  # held-out synthetic ASR after suppression and the mini restore, mean over held-out variants
    ppl_ratio: float  # clean perplexity / the unsuppressed twin's
    removal: float | None  # share of the held-out backdoor's likelihood removed (0 = none, 1 = as the clean twin)


class TauSelection(_Artifact):
    """score/tau_selection.json (`score --tau auto`, pipeline/tau_auto.py): every measurement behind the choice."""

    grid: list[float]  # the τ values tried
    target_removal: float
    target_asr: float
    max_ppl_increase: float
    holdout: list[int]  # the variants held out in turn
    prompts: int  # triggered prompts per held-out variant
    attention_units: int  # units suppressed with each τ
    mini_restore: dict[str, Any]  # the restore options of each measurement (config.RestoreOptions)
    runs: list[dict[str, Any]]  # one per (held-out variant, τ): behavior NLL, ASR, perplexity
    clean_twins: list[dict[str, Any]]  # the same measured on each held-out variant's clean twin
    table: list[TauRow]  # runs averaged over the held-out variants, τ = 0 first
    min_gap_nats: float  # a held-out backdoor whose NLL gap to its clean twin is smaller did not take
    synthetic_asr_before: float
    tau: float  # the choice
    reason: str  # which rule chose it


# ------------------------------------------------------------------------------------------------------- compare


class CompareRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str  # "none" (the suspicious adapter), a baseline, or "ours"
    triggered_asr: float | None  # eval.json triggered.asr
    clean_asr: float | None  # eval.json clean.asr
    perplexity: float | None
    mc_acc: float | None = None  # mean accuracy over --mc tasks
    wall_time_s: float  # producing the model (none = 0; ours = all purify stages), not evaluating it
    model: str  # the defended model's path
    eval: str  # its eval.json
    eval_key: str  # fingerprint of (model, eval inputs): an equal key on rerun reuses the eval


class Compare(_Artifact):
    """compare/compare.json: every method evaluated the same way."""

    adapter: str  # the suspicious adapter
    base: str
    clean: str  # the clean data the fine-tuning methods use
    triggered: str  # test files
    clean_test: str
    task: str
    limit: int | None
    max_new_tokens: int
    methods: list[str]  # in row order
    defend_options: dict[str, Any]  # the baselines' settings (lab.defend.DefendOptions)
    purify_config: dict[str, Any]  # the config "ours" ran with (config.PurifyConfig)
    rows: list[CompareRow]


# -------------------------------------------------------------------------------------------------------- purify


class PurifyRecord(_Artifact):
    """OUT/purify.json: what the last `bdclean purify` in this run folder did."""

    stage: Literal["purify"] = "purify"  # marks the file as purify's (records from before the key lack it)
    adapter: str  # the suspicious model as given
    mode: str  # "adapter", "full", or "extract" (a full checkpoint's update over --base, purified as an adapter)
    config: dict[str, Any]  # config.PurifyConfig after CLI > YAML > defaults
    stage_seconds: dict[str, float]  # wall time per stage (a skipped stage takes ~0)
    total_seconds: float
    purified: str  # the purified model's folder
    extracted: str | None = None  # --extract: the adapter extracted from the checkpoint (the pipeline's input)
    merged: str | None = None  # --merge: the purified adapter folded into the base (a full checkpoint)
    tokenizer: dict[str, Any] | None = None  # full checkpoints: the trusted tokenizer used (io.tokenizers)
    placement: dict[str, Any] | None = None  # device, dtype, torch (and CUDA) versions (train.device.Placement)


# ----------------------------------------------------------------------------------------------- benchmark cells


class GridCell(_Artifact):
    """bench/results/cells/CELL.json (bench/grid.py): one attack × task cell, every defense's compare row."""

    cell: str  # "ATTACK-TASK"
    attack: str
    task: str
    date: str  # of the last sitting that changed a row
    machine: dict[str, Any]  # bench/machine.py describe(): CPU, cores, platform, torch
    limit: int | None  # held-out prompts per test set
    commands: list[str]  # the compare commands behind the rows (relative paths)
    seconds_this_sitting: float
    implant: dict[str, Any]  # the suspicious adapter's attack.json
    rows: list[CompareRow]  # "ours+NAME": bdclean with a restore-only variant YAML on the same twins


class SkillRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str
    regime: str  # "generic" (shipped clean data only) | "prompts" (plus the adapter's answers to task prompts)
    triggered_asr: float
    clean_asr: float
    skill: float  # the skill metric on clean prompts
    perplexity: float  # of the generic reference answers
    wall_time_s: float | None
    kept_update_share: float | None  # of the adapter's weight update, after suppression (before restore)
    eval: str | None = None  # its eval.json
    retention: float | None  # (skill − reset) / (suspicious − reset), same regime


class SkillCell(_Artifact):
    """bench/results/skill/CELL.json (bench/skill.py): a skill adapter with a backdoor, every method, both regimes."""

    cell: str
    skill: str
    attack: str
    task: str
    date: str
    machine: dict[str, Any]
    limit: int
    prompts: Any  # the task prompts of the "prompts" regime
    command: str
    seconds_this_sitting: float
    implant: dict[str, Any]
    rows: list[SkillRow]


class FullRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str  # "none" (the checkpoint), a full-model baseline, "ours", or a known-base route method (*-extract)
    route: str  # "full" (the checkpoint's weights, no base known) | "extract" (its update as a LoRA on the base)
    triggered_asr: float
    clean_asr: float
    perplexity: float  # of the clean references
    empty: int  # empty answers, triggered and clean together
    wall_time_s: float | None  # to produce the model (the extract included on the extract route)
    peak_rss_gb: float | None  # of the producing commands' process trees
    kept_update_share: float | None  # of the checkpoint's update over the base, where it is known
    eval: str | None = None


class FullCell(_Artifact):
    """bench/results/full_cells/CELL.json (bench/full.py): a full checkpoint with a backdoor, every defense."""

    cell: str  # "ATTACK-TASK"
    attack: str
    task: str
    date: str
    machine: dict[str, Any]
    limit: int
    commands: list[str]
    seconds_this_sitting: float
    implant_s: float | None
    implant: dict[str, Any]
    rows: list[FullRow]


# --------------------------------------------------------------------------------------------------------- use

A = TypeVar("A", bound=_Artifact)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    return f"{where}: {err['msg']}"


def checked(model: type[A], record: dict) -> dict:
    """``record`` with ``schema_version`` first, validated against ``model`` (an internal error if it does not fit
    or holds an undocumented key); the dict to write."""
    out = {"schema_version": model.SCHEMA_VERSION, **{k: v for k, v in record.items() if k != "schema_version"}}
    try:
        parsed = model.model_validate(out)
    except ValidationError as e:
        raise BdcleanError(f"internal error: the {model.__name__} record does not fit its schema "
                           f"({_first_error(e)})") from None
    if parsed.model_extra:
        raise BdcleanError(f"internal error: the {model.__name__} record has undocumented keys "
                           f"{sorted(parsed.model_extra)} (describe them in bdclean/schemas.py)")
    return out


def parse(model: type[A], obj: Any, source: str | Path) -> A:
    """``obj`` (read from ``source``) as ``model``: version 0 (no schema_version) and versions up to this bdclean's
    read; a newer one, or a file that does not fit, is an InputError of one line."""
    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object ({model.__name__})")
    version = obj.get("schema_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InputError(f"{source}: schema_version {version!r} is not a version number")
    if version > model.SCHEMA_VERSION:
        raise InputError(f"{source}: written by a newer bdclean (schema_version {version}; this one reads up to "
                         f"{model.SCHEMA_VERSION}); upgrade bdclean to read it")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise InputError(f"{source}: not a {model.__name__.lower()} record bdclean wrote ({_first_error(e)})") from None


def read(model: type[A], path: Path) -> A:
    """The artifact at ``path`` as ``model`` (see parse)."""
    from bdclean.io.artifacts import read_json

    return parse(model, read_json(path), path)


def write(model: type[A], path: Path, record: dict) -> dict:
    """Validate ``record`` against ``model`` and write it (atomically) with its schema_version; returns what was
    written."""
    from bdclean.io.artifacts import write_json

    out = checked(model, record)
    write_json(path, out)
    return out
