"""Fingerprints of a stage's inputs (data files, model directories, adapters), as manifests record them."""

from __future__ import annotations

from pathlib import Path

from bdclean import constants as C
from bdclean.io.artifacts import fingerprint, sha256_file
from bdclean.io.data import BUILTIN, check_data_file


def data_hash(clean: str) -> str:
    """Hash of a data file, or of the shipped set for ``builtin``."""
    if clean == BUILTIN:
        from importlib import resources

        from bdclean.io.data import BUILTIN_FILE

        return "builtin:" + sha256_file(Path(str(resources.files("bdclean.data").joinpath(BUILTIN_FILE))))
    check_data_file(Path(clean))
    return sha256_file(Path(clean))


def model_hash(model_dir: Path) -> str:
    """Hash of a model directory's config and weights (not its tokenizer or README)."""
    from bdclean.io.models import model_weight_files

    parts = [sha256_file(model_dir / "config.json")] + [sha256_file(f) for f in model_weight_files(model_dir)]
    return fingerprint(parts)


def adapter_hash(adapter_dir: Path) -> str:
    return fingerprint([sha256_file(adapter_dir / C.ADAPTER_CONFIG), sha256_file(adapter_dir / C.ADAPTER_WEIGHTS)])
