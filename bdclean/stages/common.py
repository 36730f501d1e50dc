"""Helpers shared by stages: input fingerprints, skip logic, timing."""

from __future__ import annotations

from pathlib import Path

from bdclean.console import log
from bdclean.io.artifacts import is_complete, load_manifest, sha256_file, sha256_path
from bdclean.io.data import BUILTIN


def data_hash(clean: str) -> str:
    """Hash of a data file, or of the shipped set for ``builtin``."""
    if clean == BUILTIN:
        from importlib import resources

        from bdclean.io.data import BUILTIN_FILE

        return "builtin:" + sha256_file(Path(str(resources.files("bdclean.data").joinpath(BUILTIN_FILE))))
    from bdclean.errors import InputError

    if not Path(clean).is_file():
        raise InputError(f"{clean}: data file not found")
    return sha256_file(Path(clean))


def model_hash(model_dir: Path) -> str:
    """Hash of a model directory's config and weights (not its tokenizer or README)."""
    from bdclean.io.models import model_weight_files

    parts = [sha256_file(model_dir / "config.json")] + [sha256_file(f) for f in model_weight_files(model_dir)]
    from bdclean.io.artifacts import fingerprint

    return fingerprint(parts)


def adapter_hash(adapter_dir: Path) -> str:
    from bdclean import constants as C
    from bdclean.io.artifacts import fingerprint

    return fingerprint([sha256_file(adapter_dir / C.ADAPTER_CONFIG), sha256_file(adapter_dir / C.ADAPTER_WEIGHTS)])


def up_to_date(folder: Path, fp: str, stage: str, force: bool) -> bool:
    if force:
        return False
    if is_complete(folder, fp):
        man = load_manifest(folder) or {}
        log(f"skip {stage}: up to date in {folder} ({man.get('wall_time_s', '?')} s when made)", style="green")
        return True
    if load_manifest(folder) is not None:
        log(f"{stage}: inputs or options changed since {folder} was made; recomputing")
    return False


def recorded_path(pman: dict, key: str) -> str | None:
    """The suspicious ``adapter`` or ``base`` path train-pairs used, absolute where the manifest has it."""
    return (pman.get("extra", {}).get("paths") or {}).get(key) or pman.get("config", {}).get(key)


__all__ = ["data_hash", "model_hash", "adapter_hash", "up_to_date", "sha256_path", "recorded_path"]
