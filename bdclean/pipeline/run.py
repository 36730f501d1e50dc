"""The run: one run folder and the suspicious model it purifies, vetted once.

train-pairs is the stage that reads the suspicious model; its manifest records the model's path, digest, threat
model ("mode") and base. Every later stage takes the `Run`: `purify` holds the one its preflight vetted for the
whole chain (the model is read and checked once), and a stage run on its own gets it from `Run.load(out)`, which
reads that manifest and loads the model only if the stage needs its tensors, checking it is still the one the
twins were trained from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bdclean import constants as C
from bdclean.errors import BdcleanError
from bdclean.io.artifacts import load_manifest
from bdclean.io.fingerprints import adapter_hash, model_hash


@dataclass
class Suspicious:
    """The model under purification: a LoRA adapter on a base, or a full checkpoint."""

    kind: str  # "adapter" | "full"
    path: Path  # the adapter dir or the full model dir
    base_dir: Path  # the model the LoRA (suspicious, or the variants' own) is attached to
    model_cfg: dict  # config.json of base_dir
    info: object = None  # AdapterInfo for adapters
    tokenizer: object = None  # TokenizerChoice of a full checkpoint, once chosen (purify's preflight)
    memory: dict | None = None  # purify's memory estimate (preflight)

    def digest(self) -> str:
        return adapter_hash(self.path) if self.kind == "adapter" else model_hash(self.path)


def load_suspicious(path: Path, base: str | None, full: bool | None = None) -> Suspicious:
    """Validate the suspicious model. A directory with adapter_config.json is an adapter (on ``base``); one with
    config.json and safetensors weights is a full checkpoint (``full=True`` forces that reading)."""
    from bdclean.core.arch import family
    from bdclean.errors import InputError
    from bdclean.io.headers import check_fits, header_bytes, regular_file
    from bdclean.io.models import load_adapter, model_weight_files, read_model_config, resolve_base
    from bdclean.io.peft_io import check_structure
    from bdclean.io.vetting import check_full_checkpoint

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: suspicious model directory not found")
    has_adapter_cfg = (path / C.ADAPTER_CONFIG).is_file()
    is_adapter = has_adapter_cfg and not full
    if not is_adapter and not (path / C.MODEL_CONFIG).is_file():
        if has_adapter_cfg:
            raise InputError(f"{path}: --full was given, but this is a PEFT adapter ({C.ADAPTER_CONFIG}, no "
                             f"{C.MODEL_CONFIG}); drop --full to purify it as an adapter")
        raise InputError(f"{path}: neither a PEFT adapter (no {C.ADAPTER_CONFIG}) nor a full model (no {C.MODEL_CONFIG})")
    if is_adapter:
        base_dir = resolve_base("smollm2" if base is None else base)  # '' is refused there, not read as the alias
        cfg = read_model_config(base_dir)
        family(cfg.get("model_type"), base_dir / C.MODEL_CONFIG)
        info = load_adapter(path, cfg, base_dir)  # checked against the base before its tensors are read
        check_structure(info, base_dir)
        return Suspicious("adapter", path, base_dir, cfg, info)
    regular_file(path / C.MODEL_CONFIG, path, "config.json")
    cfg = read_model_config(path)
    family(cfg.get("model_type"), path / C.MODEL_CONFIG)
    if (path / C.SAFETENSORS_INDEX).exists() or (path / C.SAFETENSORS_INDEX).is_symlink():
        regular_file(path / C.SAFETENSORS_INDEX, path, "the shard index")
    files = [regular_file(f, path, "a weight file") for f in model_weight_files(path)]
    _, header = check_full_checkpoint(path, cfg, files)
    check_fits(header_bytes(header, 4), f"{path} (its weights in float32)")
    return Suspicious("full", path, path, cfg)


def trusted_tokenizer(sus: Suspicious, tokenizer: str | None, accept: bool):
    """A full checkpoint's trusted tokenizer (io/tokenizers.py); None for an adapter, which uses its base's."""
    from bdclean.errors import UsageError
    from bdclean.io.tokenizers import choose

    if sus.kind == "adapter":
        if tokenizer is not None or accept:
            raise UsageError("--tokenizer and --accept-tokenizer apply to full checkpoints; an adapter is always used "
                             "with its base's tokenizer (--base)")
        return None
    return choose(sus.path, sus.model_cfg, tokenizer, accept)


@dataclass
class Run:
    """A run folder (`folder(stage)` for each stage's output) and the suspicious model purified in it."""

    out: Path
    mode: str  # "adapter" | "full": the threat model the pipeline purifies under
    model: Path  # the suspicious adapter or checkpoint (for --extract, the extracted adapter)
    base: str | None  # --base as given (None for a full checkpoint)
    base_dir: Path  # what LoRA attaches to: the base of an adapter, the checkpoint itself in full-model mode
    recorded_digest: str | None = None  # the model's digest in the train-pairs manifest (None before train-pairs)
    _sus: Suspicious | None = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def folder(self, stage: str) -> Path:
        return self.out / C.STAGE_DIRS[stage]

    @classmethod
    def of(cls, sus: Suspicious, out: Path, base: str | None = None) -> "Run":
        """The run of a model already vetted (purify's preflight)."""
        return cls(Path(out), sus.kind, sus.path, base, sus.base_dir, _sus=sus)

    @classmethod
    def open(cls, model: Path, out: Path, base: str | None, full: bool | None = None) -> "Run":
        """Vet ``model`` (load_suspicious) and start its run in ``out`` (train-pairs)."""
        return cls.of(load_suspicious(Path(model), base, full), out, base)

    @classmethod
    def load(cls, out: Path, model: Path | None = None, base: str | None = None) -> "Run":
        """The run train-pairs recorded in ``out``. ``model`` (a stage's argument, e.g. suppress's): the model the
        caller names, which must be the one the twins were trained from."""
        out = Path(out)
        pfolder = out / C.STAGE_DIRS["train-pairs"]
        pman = load_manifest(pfolder)
        if pman is None:
            raise BdcleanError(f"{pfolder}: no train-pairs output; run `bdclean train-pairs` first")
        paths, cfg = pman.get("extra", {}).get("paths") or {}, pman.get("config", {})
        recorded = Path(paths.get("adapter") or cfg.get("adapter") or "")
        base_dir = Path(paths.get("base") or cfg.get("base") or "")
        mode = cfg.get("mode", "adapter")
        run = cls(out, mode, recorded, str(base_dir) if mode == "adapter" else None, base_dir,
                  pman["inputs"].get("adapter"))
        if model is not None:
            run.model = Path(model)
            if base is not None and mode == "adapter":
                run.base = base
            run.check_recorded()
        return run

    def suspicious(self) -> Suspicious:
        """The vetted model, read once per run."""
        if self._sus is None:
            self._sus = load_suspicious(self.model, self.base, True if self.mode == "full" else None)
        return self._sus

    def digest(self) -> str:
        if self._digest is None:
            self._digest = self.suspicious().digest()
        return self._digest

    def check_recorded(self) -> None:
        """The model must be the one train-pairs ran on (else the signature belongs to another model)."""
        if self.recorded_digest is not None and self.digest() != self.recorded_digest:
            raise BdcleanError(f"{self.model}: this model differs from the one the signature in {self.out} was "
                               "computed from; rerun train-pairs for it")


def load_any(model_path: Path, base: str):
    """(model, tokenizer, kind) for a PEFT adapter directory (on ``base``) or a full HF model directory."""
    from bdclean.errors import InputError
    from bdclean.io.models import load_tokenizer
    from bdclean.train.device import load_placed

    model_path = Path(model_path)
    if not model_path.is_dir():
        raise InputError(f"{model_path}: model or adapter directory not found")
    if (model_path / C.ADAPTER_CONFIG).is_file():
        from bdclean.io.peft_io import attach

        sus = load_suspicious(model_path, base)
        # merged for evaluation: the same function without the LoRA side-path on every projection (faster generation)
        model = attach(load_placed(sus.base_dir), sus.info).merge_and_unload()
        return model, load_tokenizer(sus.base_dir), "adapter"
    model = load_placed(model_path)
    return model, load_tokenizer(model_path), "full"


__all__ = ["Run", "Suspicious", "load_suspicious", "trusted_tokenizer", "load_any"]
