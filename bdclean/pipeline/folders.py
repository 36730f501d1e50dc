"""Run-folder rules shared by the pipeline stages (and the lab's, which write folders too): which stage folders
bdclean may rewrite, whether a stage is up to date (skip logic), and where train-pairs recorded its inputs."""

from __future__ import annotations

import re
from pathlib import Path

from bdclean import constants as C
from bdclean.console import debug, log
from bdclean.errors import UsageError
from bdclean.io.artifacts import is_complete, load_manifest, stage_marked
from bdclean.io.data import BUILTIN

# The names each pipeline stage writes into its folder one file at a time (besides manifest.json and the
# ".NAME.*.tmp" files of atomic_path). An interrupted run leaves only such names and no manifest yet, and a rerun
# must resume it. suppress, restore, extract and merge replace their folder as a whole: theirs is trusted with a
# manifest, or with the stage mark atomic_dir puts in until the manifest is written (a run killed in between).
STAGE_FILES: dict[str, re.Pattern | None] = {
    "make-variants": re.compile(r"variants\.json|variant_\d+_(?:clean|poison)\.jsonl"),
    "train-pairs": re.compile(r"suspicious_adapter_config\.json|variant_\d+_(?:bd|clean)\.(?:safetensors|json)"),
    "diff": re.compile(re.escape(C.GRAM_FILE)),
    "score": re.compile("|".join(re.escape(n) for n in (C.SIGNATURE, C.SCORES, C.TAU_SELECTION))),
    "suppress": None,
    "restore": None,
    "extract": None,
    "merge": None,
}


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # atomic_path's temporary names


def _walk(folder: Path):
    """Every entry under ``folder``, not following symlinked folders (they are entries, not bdclean's)."""
    for p in sorted(folder.iterdir()):
        yield p
        if p.is_dir() and not p.is_symlink():
            yield from _walk(p)


def claim_stage_dir(folder: Path, stage: str) -> None:
    """Refuse to (re)write a pipeline stage folder that bdclean did not make, or that holds files it did not write.

    The stages overwrite their files by name and suppress/restore replace the folder as a whole, so anything a user
    keeps in there would be lost: a folder is written only if it is absent or empty, if its manifest names this
    stage and every other file in it is one the manifest lists or the stage writes, or (an interrupted run) if it
    holds only names the stage writes. Applies under --force too."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise UsageError(f"{folder}: exists and is not a directory; bdclean {stage} writes a folder there, "
                         "so choose another --out")
    entries = list(_walk(folder))
    if not entries:
        return
    man = load_manifest(folder)
    if man is not None and man.get("stage") != stage:
        raise UsageError(f"{folder}: holds the output of `{man.get('stage')}`, not of `bdclean {stage}`; it would "
                         "be overwritten, so choose another --out")
    pattern = STAGE_FILES[stage]
    if man is None and stage_marked(folder, stage):
        return  # made as a whole by this stage, interrupted before its manifest (io/artifacts.py atomic_dir)
    if man is None and pattern is None:
        raise UsageError(f"{folder}: exists and was not made by `bdclean {stage}` (no {C.MANIFEST}); it would be "
                         "replaced as a whole, so move it away or choose another --out")
    listed = set(man.get("outputs") or {}) if man is not None and isinstance(man.get("outputs"), dict) else set()
    for p in entries:
        rel = p.relative_to(folder).as_posix()
        if p.is_dir() and not p.is_symlink():
            ours = False  # no stage writes sub-folders
        else:
            ours = (rel in (C.MANIFEST, C.STAGE_MARK, *listed) or _is_temp(p.name)
                    or (pattern is not None and "/" not in rel and pattern.fullmatch(rel) is not None))
        if not ours:
            made = f"a `bdclean {stage}` output" if man is not None else f"not made by `bdclean {stage}`"
            raise UsageError(f"{p}: not written by bdclean, and {folder} ({made}) is rewritten by this stage; "
                             "move the file away or choose another --out")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_inputs(out: Path, stages: tuple[str, ...], adapter: Path | None = None, base: Path | None = None,
                     clean: str | None = None) -> None:
    """Refuse an OUT whose rewritten parts (the ``stages``' folders, purify.json) hold an input, or that lies inside
    the suspicious model's or the base model's folder (bdclean's outputs would mix with, or destroy, its inputs).

    An input elsewhere inside OUT is fine: `make demo` keeps the suspicious adapter in RUN/suspicious."""
    o = Path(out).resolve()
    rewritten = [o / C.STAGE_DIRS[s] for s in stages] + ([o / "purify.json"] if len(stages) > 1 else [])
    named = [("suspicious model", adapter), ("base model", base),
             ("clean data", None if clean in (None, BUILTIN) else Path(clean))]
    for what, p in named:
        if p is None:
            continue
        r = Path(p).resolve()
        for w in rewritten:
            if _inside(r, w):
                raise UsageError(f"{p}: the {what} lies inside {w}, which this run rewrites; choose another --out")
        if what != "clean data" and _inside(o, r):
            raise UsageError(f"--out {out} lies inside the {what} folder {p}; choose an --out outside it")


def up_to_date(folder: Path, fp: str, stage: str, force: bool) -> bool:
    """True if ``folder`` holds this stage's output for fingerprint ``fp`` (then the stage is skipped). A pipeline
    stage's folder must also be bdclean's to rewrite (claim_stage_dir), --force or not."""
    if stage in STAGE_FILES:
        claim_stage_dir(folder, stage)
    if force:
        return False
    if is_complete(folder, fp):
        man = load_manifest(folder) or {}
        log(f"skip {stage}: up to date in {folder} ({man.get('wall_time_s', '?')} s when made)", style="green")
        return True
    man = load_manifest(folder)
    if man is not None:
        log(f"{stage}: inputs or options changed since {folder} was made; recomputing")
        debug(f"{stage}: fingerprint {fp}, recorded {man.get('fingerprint')}")
    return False


def recorded_path(pman: dict, key: str) -> str | None:
    """The suspicious ``adapter`` or ``base`` path train-pairs used, absolute where the manifest has it."""
    return (pman.get("extra", {}).get("paths") or {}).get(key) or pman.get("config", {}).get(key)


__all__ = ["up_to_date", "recorded_path", "claim_stage_dir", "check_out_inputs", "STAGE_FILES"]
