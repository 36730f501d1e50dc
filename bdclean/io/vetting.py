"""The hostile-input rules (SECURITY.md, 'Guarantees' 1-3): what a suspicious adapter or checkpoint may contain
before bdclean reads a tensor of it or builds a model from it. Each check raises InputError with one line naming
the file and the rule; loading (io/models.py, io/headers.py) calls them, so every command that reads a suspicious
model applies the same rules, `bdclean validate` included.

- no code runs: pickle files are refused unopened, configs asking for remote code (``auto_map``) refused;
- nothing outside the vetted weights: only lora_A/lora_B of decoder MLP and attention projections, no
  ``modules_to_save``, trained tokens, LoRA bias, base-rewriting initialisations (UNVETTED_FEATURES);
- every declared size against the weight headers and the base before anything is allocated, float dtypes only.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from bdclean import constants as C
from bdclean.core.arch import ALL_PROJ, LAYER_RE, LAYER_WEIGHT_RE, LORA_FACTOR_RE, PART_OF, family
from bdclean.errors import InputError
from bdclean.io.headers import FLOAT_DTYPES, Dims, Header, config_dims, part_shapes, projection_shapes, quote, read_header

if TYPE_CHECKING:
    from bdclean.io.models import AdapterInfo


def check_model_config(cfg: dict, cfg_path: Path) -> None:
    """A config.json (of a checkpoint or a base) that asks for remote code is refused: bdclean never runs it."""
    if cfg.get("auto_map"):
        raise InputError(f"{cfg_path}: asks for remote code (auto_map); bdclean never runs code from a checkpoint")


# adapter config features that add weights outside the LoRA factors bdclean vets, change when the adapter acts, or
# rewrite the base weights when PEFT builds the model; a hostile adapter could hide a backdoor in any of them
UNVETTED_FEATURES = {
    "modules_to_save": "full replacement weights for whole modules",
    "trainable_token_indices": "trained embedding rows",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on raw parameters",
    "alora_invocation_tokens": "activated LoRA (acts only after invocation tokens)",
    "lora_bias": "LoRA bias vectors",
}


BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # these change the base weights at construction


def check_no_pickles(folder: Path, what: str) -> None:
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in C.PICKLE_SUFFIXES)
    if found:
        has_st = any(p.suffix == ".safetensors" for p in folder.iterdir())
        if not has_st:
            raise InputError(
                f"{folder}: {what} weights are pickle files ({', '.join(found)}); bdclean never unpickles "
                "untrusted checkpoints. Convert them to safetensors in an isolated sandbox first "
                "(e.g. `save_pretrained(..., safe_serialization=True)`)"
            )


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _regex(pattern: object, key: str, cfg_path: Path) -> None:
    if not isinstance(pattern, str):
        raise InputError(f"{cfg_path}: {key} must hold regular expressions (strings), not {pattern!r}")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise InputError(f"{cfg_path}: {key}: {quote(pattern)} is not a valid regular expression ({e})") from None


def check_lora_config(cfg: dict, cfg_path: Path) -> None:
    """The LoRA fields PEFT builds the adapter from, checked as PEFT would need them (it fails late, or not at all:
    a NaN alpha trains NaNs, a declared rank is allocated before any tensor is compared with it)."""
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise InputError(f"{cfg_path}: no {key!r}; a PEFT LoRA config names its rank (r), lora_alpha and "
                             "target_modules")
    r = cfg["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{cfg_path}: r must be a positive integer (the LoRA rank), not {r!r}")
    alpha = cfg["lora_alpha"]
    if not _number(alpha) or not math.isfinite(alpha):
        raise InputError(f"{cfg_path}: lora_alpha must be a finite number, not {alpha!r}")
    drop = cfg.get("lora_dropout", 0.0)
    if not _number(drop) or not 0 <= drop < 1:
        raise InputError(f"{cfg_path}: lora_dropout must be a number in [0, 1), not {drop!r}")
    for key, ok, what in (("alpha_pattern", lambda v: _number(v) and math.isfinite(v), "finite numbers"),
                          ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                           "positive integers")):
        pats = cfg.get(key) or {}
        if not isinstance(pats, dict):
            raise InputError(f"{cfg_path}: {key} must map module patterns to values, not {pats!r}")
        for pat, v in pats.items():
            _regex(pat, key, cfg_path)
            if not ok(v):
                raise InputError(f"{cfg_path}: {key}[{quote(pat)}] must be one of {what}, not {v!r}")
    tm = cfg["target_modules"]
    if isinstance(tm, str):
        _regex(tm, "target_modules", cfg_path)
    elif not (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm)):
        raise InputError(f"{cfg_path}: target_modules must be a regular expression or a list of module names, "
                         f"not {tm!r}")
    ltt = cfg.get("layers_to_transform")
    layers = [ltt] if isinstance(ltt, int) and not isinstance(ltt, bool) else ltt
    if ltt is not None and not (isinstance(layers, list) and layers
                                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise InputError(f"{cfg_path}: layers_to_transform must be a layer index or a list of them, not {ltt!r}")
    lp = cfg.get("layers_pattern")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(x, str) for x in lp))):
        raise InputError(f"{cfg_path}: layers_pattern must be a name or a list of names, not {lp!r}")
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{cfg_path}: bias={cfg.get('bias')!r} trains the base's bias vectors, which bdclean does not "
                         "vet; only bias='none' adapters can be purified")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise InputError(f"{cfg_path}: task_type {cfg.get('task_type')!r}; bdclean purifies causal LM adapters "
                         "(CAUSAL_LM) only")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise InputError(f"{cfg_path}: {key} must be true or false, not {cfg.get(key)!r}")
    if cfg.get("fan_in_fan_out"):
        raise InputError(f"{cfg_path}: fan_in_fan_out=true is for Conv1D (GPT-2) layers; a Llama-family base has "
                         "Linear projections")


def check_config_features(cfg: dict, cfg_path: Path) -> None:
    """Refuse adapter configs whose behaviour lies outside the LoRA factors of MLP and attention projections."""
    for key, what in UNVETTED_FEATURES.items():
        if cfg.get(key):
            raise InputError(f"{cfg_path}: {key} is set ({what}); bdclean only vets LoRA factors on MLP and "
                             "attention projections, so it cannot purify this adapter")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise InputError(f"{cfg_path}: init_lora_weights={init!r} rewrites the base weights when the adapter is "
                         "built; convert the adapter to plain LoRA first (PEFT documents how)")


def check_tensor_keys(tensors: dict, wpath: Path) -> None:
    """Every tensor must be a lora_A/lora_B weight of a decoder layer's MLP or attention projection."""
    for k in tensors:
        m = LORA_FACTOR_RE.match(k)
        if m is None or m.group("proj") not in ALL_PROJ:
            raise InputError(f"{wpath}: tensor {quote(k)} is not a LoRA factor of an MLP or attention projection "
                             "(embedding, lm_head, bias or whole-module weights); bdclean cannot vet it")


def check_adapter_fits(info: AdapterInfo, base_cfg: dict, base_dir: Path) -> None:
    """Every LoRA factor (MLP and attention) must match the base model's layer count and projection sizes, and
    layers_to_transform must name layers the base has; checked on the header's shapes, before any data is read."""
    dims = config_dims(base_cfg, base_dir / C.MODEL_CONFIG)
    ltt = info.config.get("layers_to_transform")
    for i in [ltt] if isinstance(ltt, int) else ltt or []:
        if i >= dims.layers:
            raise InputError(f"{info.folder / C.ADAPTER_CONFIG}: layers_to_transform names layer {i}, but base "
                             f"{base_dir} has {dims.layers} layers")
    expect = part_shapes(dims)
    for mod, (ka, kb) in info.module_pairs().items():
        m = LAYER_RE.search(mod)
        if m and int(m.group(1)) >= dims.layers:
            raise InputError(f"{info.folder}: {quote(mod)} names layer {m.group(1)} but base {base_dir} has "
                             f"{dims.layers} layers")
        a, b = info.shapes[ka], info.shapes[kb]
        fan_in, fan_out = expect[PART_OF[mod.rsplit(".", 1)[-1]]]  # check_tensor_keys allowed only these projections
        if a[1] != fan_in or b[0] != fan_out:
            raise InputError(
                f"{info.folder}: {quote(mod)} has shape in={a[1]} out={b[0]} but base {base_dir} expects "
                f"in={fan_in} out={fan_out}; adapter made for a different base?"
            )


def check_float_dtypes(header: Header, path: Path) -> None:
    for k, (dt, _) in header.items():
        if dt not in FLOAT_DTYPES:
            raise InputError(f"{path}: tensor {quote(k)} has dtype {dt}; bdclean reads float16, bfloat16, float32 "
                             "or float64 weights only (convert float8 or quantised weights in a sandbox first)")


def check_full_checkpoint(model_dir: Path, cfg: dict, files: list[Path]) -> tuple[Dims, Header]:
    """A full checkpoint's config.json against its weight headers: every projection of every declared layer is
    there with the shape the config gives, and no layer lies beyond it. So the model transformers builds from the
    config is the one stored in the files (a config claiming 10^9 layers would be built, and allocated, first)."""
    cfg_path = model_dir / C.MODEL_CONFIG
    if cfg.get("quantization_config") is not None:
        raise InputError(f"{cfg_path}: quantization_config is set (a quantised checkpoint); bdclean trains and "
                         "suppresses float weights only: dequantise it to float16/32 safetensors in a sandbox first")
    dims = config_dims(cfg, cfg_path)
    fam = family(cfg.get("model_type"), cfg_path)
    header: Header = {}
    for f in files:
        h = read_header(f)
        check_float_dtypes(h, f)
        header.update(h)
    emb = header.get("model.embed_tokens.weight")
    if emb is None or emb[1] != (dims.vocab, dims.hidden):
        raise InputError(f"{model_dir}: model.embed_tokens.weight is {None if emb is None else list(emb[1])}, but "
                         f"config.json declares vocab_size {dims.vocab} × hidden_size {dims.hidden}")
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    for k, (_, shape) in header.items():
        m = LAYER_WEIGHT_RE.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = shape
    beyond = sorted(i for i in found if i >= dims.layers)
    if beyond:
        raise InputError(f"{model_dir}: weights of layer {beyond[0]}, but config.json declares num_hidden_layers "
                         f"{dims.layers}")
    for i in range(dims.layers):
        have = found.get(i)
        if have is None:
            raise InputError(f"{model_dir}: config.json declares num_hidden_layers {dims.layers}, but the weights "
                             f"have no layer {i}")
        for proj, (fan_in, fan_out) in projection_shapes(dims, fam).items():
            got = have.get(proj)
            if got != (fan_out, fan_in):
                layer = fam["layer"].format(layer=i)
                raise InputError(f"{model_dir}: {layer} {proj} is {None if got is None else list(got)}, but "
                                 f"config.json declares [{fan_out}, {fan_in}] (hidden_size, intermediate_size, heads)")
    return dims, header
