"""Building PEFT models from validated adapter tensors, and writing adapter directories atomically.

PEFT is never asked to read weights from disk itself: we validate and read the safetensors file (io.models), build
the LoRA structure from the JSON config and copy the tensors in.
"""

from __future__ import annotations

import json
from pathlib import Path

from bdclean import constants as C
from bdclean.errors import InputError
from bdclean.io.artifacts import atomic_dir, save_tensors, write_text
from bdclean.io.models import AdapterInfo


def lora_config_from_dict(config: dict, where: Path | str):
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    cfg = {k: v for k, v in config.items() if k in known}
    cfg.pop("peft_type", None)
    cfg["inference_mode"] = False
    cfg["init_lora_weights"] = True  # the tensors are copied in afterwards; no init may touch the base weights
    try:
        return LoraConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise InputError(f"{where}: invalid LoRA config ({e})") from None


def lora_config(info: AdapterInfo):
    return lora_config_from_dict(info.config, info.folder)


def check_structure(info: AdapterInfo, base_dir: Path) -> None:
    """Build the adapter's LoRA structure as `attach` will, on the meta device (no memory is allocated), and compare
    it with the file: the modules its config targets (target_modules, layers_to_transform, rank_pattern) must be
    exactly the modules the file holds, with the same shapes. Whatever PEFT would reject mid-run is refused here."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from bdclean.console import quiet_library_output
    from bdclean.io.headers import quote

    cfg_path = info.folder / C.ADAPTER_CONFIG
    lcfg = lora_config(info)
    try:
        with quiet_library_output(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False),
                                                     trust_remote_code=False)
            built = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(get_peft_model(model, lcfg)).items()}
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
        raise InputError(f"{cfg_path}: PEFT cannot build this LoRA config on base {base_dir} "
                         f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    stray = sorted(set(info.shapes) - set(built))
    if stray:
        raise InputError(f"{info.folder}: tensor {quote(stray[0])} is for a module the config's target_modules / "
                         "layers_to_transform do not select; PEFT would drop it")
    absent = sorted(set(built) - set(info.shapes))
    if absent:
        raise InputError(f"{cfg_path}: target_modules / layers_to_transform select a module the weights lack "
                         f"(no {quote(absent[0])})")
    for k, shape in built.items():
        if info.shapes[k] != shape:
            raise InputError(f"{info.folder}: tensor {quote(k)} is {list(info.shapes[k])}, but its config builds "
                             f"{list(shape)} on base {base_dir}")


def new_lora(base_model, lcfg):
    """``get_peft_model`` without its UserWarnings (they name site-packages paths and PEFT internals)."""
    from peft import get_peft_model

    from bdclean.console import quiet_library_output

    with quiet_library_output():
        return get_peft_model(base_model, lcfg)


def attach(base_model, info: AdapterInfo, tensors: dict | None = None):
    """Wrap ``base_model`` with the adapter's LoRA structure and load ``tensors`` (default: the adapter's own)."""
    from peft import set_peft_model_state_dict

    from bdclean.console import quiet_library_output

    model = new_lora(base_model, lora_config(info))
    with quiet_library_output():
        res = set_peft_model_state_dict(model, tensors if tensors is not None else info.tensors)
    unexpected = [k for k in res.unexpected_keys if "lora_" in k]
    if unexpected:
        raise InputError(f"{info.folder}: adapter tensors do not fit the base model (e.g. {unexpected[0]})")
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing:
        raise InputError(f"{info.folder}: adapter lacks tensors the base expects (e.g. {missing[0]})")
    return model


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_state(model, tensors: dict) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, tensors)


def write_adapter_files(folder: Path, config: dict, tensors: dict) -> None:
    """The two files of a PEFT adapter (config + safetensors) into an existing (temporary) folder."""
    write_text(folder / C.ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_tensors(folder / C.ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})


def write_adapter(folder: Path, config: dict, tensors: dict, extra_files: dict[str, str] | None = None,
                  stage: str | None = None) -> None:
    """Write a PEFT adapter directory (config + safetensors) atomically: all of it appears, or none (``stage``: as
    that pipeline stage's output, atomic_dir)."""
    with atomic_dir(folder, stage) as tmp:
        write_adapter_files(tmp, config, tensors)
        for name, text in (extra_files or {}).items():
            write_text(tmp / name, text)
