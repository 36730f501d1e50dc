"""Atomic writes, content hashes and stage manifests.

Every artifact is written to a temporary name in the same folder and renamed, so a crash never leaves a
half-written file under a name that a rerun trusts. Each stage folder holds a ``manifest.json`` recording the
stage's options, the hashes of what it read and of what it wrote; a rerun skips a stage only when all of those
still match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from bdclean import __version__
from bdclean.console import debug
from bdclean.constants import MANIFEST, STAGE_MARK
from bdclean.errors import BdcleanError

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def sha256_dir(path: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """Hash of every regular file under a folder (names and contents), in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.name not in exclude):
        h.update(str(p.relative_to(path)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_dir(path) if path.is_dir() else sha256_file(path)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed separators, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


_UMASK: int | None = None


def _mode(full: int) -> int:
    """``full`` (0o666 for files, 0o777 for folders) under the process umask: the temporary files and folders of
    the atomic writes are created private (0600/0700) by tempfile, and outputs should be as readable as any other
    file the user creates."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(_UMASK)
    return full & ~_UMASK


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, _mode(0o666))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, stage: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; it replaces ``final`` only if the block succeeds.

    ``stage``: the folder is that pipeline stage's output; it carries STAGE_MARK naming the stage until
    `Manifest.write` replaces the mark with the manifest, so a run killed in between leaves a folder its rerun
    recognises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, _mode(0o777))
    try:
        if stage is not None:
            (tmp / STAGE_MARK).write_text(stage + "\n", encoding="utf-8")
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
            return
        # the previous output moves into a fresh folder of its own, so a leftover from an interrupted earlier run
        # can never block this one
        graveyard = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        old = graveyard / final.name
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)  # put the previous output back: never leave neither
            graveyard.rmdir()
            raise
        shutil.rmtree(graveyard, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def stage_marked(folder: Path, stage: str) -> bool:
    """Whether ``folder`` still carries the mark atomic_dir made it with for ``stage`` (its manifest not yet
    written: a run killed in between)."""
    mark = Path(folder) / STAGE_MARK
    return (mark.is_file() and not mark.is_symlink()
            and mark.read_text(encoding="utf-8", errors="replace").strip() == stage)


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` atomically. ``metadata``: one key at most, because safetensors writes a header's metadata
    keys in the order of a hash map seeded per process, so two keys make the same tensors differ in bytes from run
    to run (and the same seed would no longer give the same artifacts)."""
    from safetensors.torch import save_file

    if metadata is not None and len(metadata) > 1:
        raise BdcleanError(f"internal error: {path.name}: safetensors metadata with more than one key is written in "
                           "a random order")

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BdcleanError(f"{path}: not valid JSON ({e})") from None


def environment() -> dict[str, str]:
    """Versions recorded in every manifest."""
    import importlib.metadata as md

    env = {"bdclean": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "peft", "safetensors"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = "absent"
    return env


class Manifest:
    """What a stage was made from and what it wrote. Schema (manifest.json):

    stage        -- the stage name, e.g. "train-pairs"
    fingerprint  -- sha256 of (config, inputs): equal fingerprints mean the stage would compute the same thing
    config       -- the stage's options after CLI > YAML > defaults
    inputs       -- {name: sha256} of every file/folder read (upstream stage folders by their fingerprint)
    outputs      -- {relative file name: sha256} of every file written
    environment  -- library versions and platform
    created      -- UTC time the stage finished
    wall_time_s  -- seconds the stage took
    extra        -- stage-specific figures (per-job times, counts...)
    """

    def __init__(self, stage: str, config: dict, inputs: dict[str, str]):
        self.stage = stage
        self.config = config
        self.inputs = inputs
        self.fingerprint = fingerprint({"stage": stage, "config": config, "inputs": inputs})
        self.extra: dict[str, Any] = {}
        self.t0 = time.time()

    def write(self, folder: Path, outputs: list[str]) -> dict:
        outputs = [o for o in outputs if o != STAGE_MARK]
        rec = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self.inputs,
            "outputs": {name: sha256_file(folder / name) for name in sorted(outputs)},
            "environment": environment(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_time_s": round(time.time() - self.t0, 3),
            "extra": self.extra,
        }
        write_json(folder / MANIFEST, rec)
        (Path(folder) / STAGE_MARK).unlink(missing_ok=True)  # the manifest vouches for the folder now
        debug(f"{self.stage}: fingerprint {self.fingerprint}, {len(outputs)} outputs → {folder / MANIFEST}")
        return rec


def load_manifest(folder: Path) -> dict | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return read_json(p)
    except BdcleanError:
        return None


def is_complete(folder: Path, expected_fingerprint: str | None = None) -> bool:
    """True if ``folder`` has a manifest (matching ``expected_fingerprint`` if given) and all its outputs intact."""
    man = load_manifest(folder)
    if not man or not isinstance(man.get("outputs"), dict):
        return False
    if expected_fingerprint is not None and man.get("fingerprint") != expected_fingerprint:
        return False
    for name, digest in man["outputs"].items():
        p = Path(folder) / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def stage_fingerprint(folder: Path, stage: str) -> str:
    """The fingerprint of a finished upstream stage, or a clear error if it is missing or incomplete."""
    man = load_manifest(folder)
    if man is None:
        raise BdcleanError(f"{folder}: no {MANIFEST}; run `bdclean {stage}` first")
    if man.get("stage") != stage:
        raise BdcleanError(f"{folder}: expected the output of `{stage}`, found `{man.get('stage')}`")
    if not is_complete(folder):
        raise BdcleanError(f"{folder}: incomplete or modified `{stage}` output; rerun `bdclean {stage}`")
    return man["fingerprint"]
