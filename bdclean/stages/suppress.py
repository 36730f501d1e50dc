"""suppress: zero the signature channels' LoRA entries in the suspicious adapter."""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.console import log
from bdclean.errors import BdcleanError
from bdclean.io.artifacts import Manifest, load_manifest, stage_fingerprint
from bdclean.stages.common import adapter_hash, up_to_date


def run(adapter: Path, out: Path, force: bool = False) -> Path:
    from safetensors.torch import load_file

    from bdclean.core.arch import mlp_module_names, peft_key
    from bdclean.core.masks import suppress_lora_channels
    from bdclean.io.models import load_adapter, read_model_config
    from bdclean.io.peft_io import write_adapter

    out = Path(out)
    sfolder = out / C.STAGE_DIRS["score"]
    pfolder = out / C.STAGE_DIRS["train-pairs"]
    folder = out / C.STAGE_DIRS["suppress"]
    info = load_adapter(adapter)
    ahash = adapter_hash(Path(adapter))
    pman = load_manifest(pfolder)
    if pman is None:
        raise BdcleanError(f"{pfolder}: no train-pairs output; run `bdclean train-pairs` first")
    if pman["inputs"].get("adapter") != ahash:
        raise BdcleanError(
            f"{adapter}: this adapter differs from the one the signature in {out} was computed from "
            f"({pman['config'].get('adapter')}); rerun train-pairs for it"
        )
    man = Manifest("suppress", {}, {"score": stage_fingerprint(sfolder, "score"), "adapter": ahash})
    if up_to_date(folder, man.fingerprint, "suppress", force):
        return folder
    mask = load_file(str(sfolder / C.SCORES))["mask"].bool()
    base_cfg = read_model_config(Path(pman["config"]["base"]))
    modules = [{k: peft_key(v) for k, v in names.items()}
               for names in mlp_module_names(base_cfg["model_type"], mask.shape[0])]
    tensors, changed = suppress_lora_channels(info.tensors, mask, modules)
    write_adapter(folder, info.config, tensors)
    man.extra = {"channels_suppressed": int(mask.sum()), "tensors_changed": changed}
    man.write(folder, [C.ADAPTER_CONFIG, C.ADAPTER_WEIGHTS])
    log(f"suppress: zeroed {int(mask.sum())} channels in {changed} LoRA tensors → {folder}")
    return folder
