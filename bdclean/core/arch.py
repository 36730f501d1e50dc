"""Weight-name templates per architecture family, kept as data: a new family is one entry."""

from __future__ import annotations

import re

from bdclean.errors import InputError

# {layer} is the block index. Names are relative to the CausalLM (as in a full checkpoint's safetensors).
FAMILIES: dict[str, dict[str, str]] = {
    "llama": {
        "layer": "model.layers.{layer}",
        "gate": "model.layers.{layer}.mlp.gate_proj",
        "up": "model.layers.{layer}.mlp.up_proj",
        "down": "model.layers.{layer}.mlp.down_proj",
        "q": "model.layers.{layer}.self_attn.q_proj",
        "k": "model.layers.{layer}.self_attn.k_proj",
        "v": "model.layers.{layer}.self_attn.v_proj",
        "o": "model.layers.{layer}.self_attn.o_proj",
    },
}
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
               "gemma2": "llama", "smollm3": "llama"}

# Everything below is derived from FAMILIES.
MLP_PARTS = ("gate", "up", "down")
ATTN_PARTS = ("q", "k", "v", "o")


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _within_layer(fam: dict[str, str], part: str) -> tuple[str, str]:
    """(block, projection) of ``part`` inside a layer, e.g. ("mlp", "gate_proj")."""
    block, proj = fam[part].removeprefix(fam["layer"] + ".").rsplit(".", 1)
    return block, proj


def projections(fam: dict[str, str], parts: tuple[str, ...] = ATTN_PARTS + MLP_PARTS) -> dict[str, str]:
    """{part: projection module name} of a family, e.g. {"q": "q_proj", ...}."""
    return {p: _within_layer(fam, p)[1] for p in parts}


def _alternatives(names: tuple[str, ...]) -> str:
    escaped = [re.escape(n) for n in names]
    return escaped[0] if len(escaped) == 1 else "(?:" + "|".join(escaped) + ")"


_FAMS = tuple(FAMILIES.values())
ATTN_PROJ = _unique(_within_layer(f, p)[1] for f in _FAMS for p in ATTN_PARTS)  # ("q_proj", "k_proj", ...)
MLP_PROJ = _unique(_within_layer(f, p)[1] for f in _FAMS for p in MLP_PARTS)  # ("gate_proj", "up_proj", ...)
ALL_PROJ = ATTN_PROJ + MLP_PROJ  # every LoRA target bdclean reads (implant and the twins train all of them)
PART_OF = {_within_layer(f, p)[1]: p for f in _FAMS for p in ATTN_PARTS + MLP_PARTS}  # {"q_proj": "q", ...}
_BLOCKS = "|".join(re.escape(b) for b in _unique(_within_layer(f, p)[0] for f in _FAMS for p in MLP_PARTS + ATTN_PARTS))
_LAYER_PATHS = _unique(f["layer"].removesuffix(".{layer}") for f in _FAMS)  # ("model.layers",)
_LAYER_LISTS = _alternatives(_unique(p.rsplit(".", 1)[-1] for p in _LAYER_PATHS))  # "layers"
LAYER_RE = re.compile(rf"{_LAYER_LISTS}\.(\d+)\.")  # the layer index in any module or weight name
# a decoder layer's projection weight in a full checkpoint: (layer, projection)
LAYER_WEIGHT_RE = re.compile(rf"^{_alternatives(_LAYER_PATHS)}\.(\d+)\.(?:{_BLOCKS})\.([a-z_]+)\.weight$")
# a LoRA factor in an adapter file: module (its PEFT key prefix) and projection
LORA_FACTOR_RE = re.compile(
    rf"^(?P<module>.+\.{_LAYER_LISTS}\.\d+\.(?:{_BLOCKS})\.(?P<proj>[a-z_]+))\.lora_[AB]\.weight$")


def family(model_type: str | None, where: object = None) -> dict[str, str]:
    """The weight-name templates of ``model_type`` (read from the config file ``where``, named in the error)."""
    fam = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        known = ", ".join(sorted(MODEL_TYPES))
        at = f"{where}: " if where is not None else ""
        raise InputError(f"{at}unsupported architecture (model_type {model_type!r}); supported model types: {known}")
    return FAMILIES[fam]


def mlp_module_names(model_type: str, num_layers: int) -> list[dict[str, str]]:
    """For each layer: {"gate": name, "up": name, "down": name} relative to the CausalLM."""
    fam = family(model_type)
    return [{k: fam[k].format(layer=i) for k in ("gate", "up", "down")} for i in range(num_layers)]


PEFT_PREFIX = "base_model.model."  # what PeftModel's wrapper adds to a CausalLM module's name in adapter files


def peft_key(module: str) -> str:
    """The key PEFT uses for a CausalLM module in adapter files."""
    return PEFT_PREFIX + module


def attn_module_names(model_type: str, num_layers: int) -> list[dict[str, str]]:
    """For each layer: {"q", "k", "v", "o"} module names relative to the CausalLM."""
    fam = family(model_type)
    return [{k: fam[k].format(layer=i) for k in ("q", "k", "v", "o")} for i in range(num_layers)]


def head_geometry(cfg: dict) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) from a config.json dict."""
    n_q = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_q)
    d = int(cfg.get("head_dim") or cfg["hidden_size"] // n_q)
    if n_q % n_kv:
        raise InputError(f"num_attention_heads {n_q} is not a multiple of num_key_value_heads {n_kv}")
    return n_q, n_kv, d
