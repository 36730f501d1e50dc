"""mc: multiple-choice accuracy through lm-evaluation-harness (``pip install lm-eval``).

Our own task ``bdclean_mc`` (bdclean/data/mc: 60 original four-option questions) works offline. Any other
lm-eval task name (``arc_easy``, ``hellaswag``...) is looked up in lm-eval's registry and needs its dataset
from the Hugging Face Hub, i.e. internet and ``HF_HUB_OFFLINE=0`` (the bdclean CLI defaults it to 1).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import shutil
import tempfile
from pathlib import Path

from bdclean.console import log
from bdclean.errors import UsageError

INSTALL_HINT = "multiple-choice evaluation needs lm-evaluation-harness: pip install lm-eval"


def _require_lm_eval():
    import importlib

    try:
        for mod in ("lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface"):
            importlib.import_module(mod)
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


def local_dir() -> Path:
    """Folder of the shipped task YAMLs and their data."""
    from importlib import resources

    return Path(str(resources.files("bdclean.data").joinpath("mc")))


@functools.lru_cache(maxsize=None)
def local_tasks() -> dict[str, Path]:
    """Task name -> YAML path for the tasks shipped with bdclean."""
    import yaml

    out = {}
    for p in sorted(local_dir().glob("*.yaml")):
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and isinstance(cfg.get("task"), str):
            out[cfg["task"]] = p
    return out


@functools.lru_cache(maxsize=None)
def _resolved_dir() -> Path:
    """A temp copy of the shipped YAMLs whose ``data_files`` are absolute (``datasets`` resolves relative
    paths against the cwd) and whose dataset cache is private (never stale, nothing left in ~/.cache)."""
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="bdclean-mc-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for name, src in local_tasks().items():
        cfg = yaml.safe_load(src.read_text(encoding="utf-8"))
        kw = dict(cfg.get("dataset_kwargs") or {})
        files = kw.get("data_files")
        if isinstance(files, str):
            files = str((src.parent / files).resolve())
        elif isinstance(files, dict):
            files = {split: str((src.parent / f).resolve()) for split, f in files.items()}
        if files is not None:
            kw["data_files"] = files
        kw["cache_dir"] = str(tmp / "cache")
        cfg["dataset_kwargs"] = kw
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return tmp


@functools.lru_cache(maxsize=None)
def _task_manager(include_defaults: bool):
    """lm-eval's TaskManager over our tasks, plus lm-eval's own registry when a non-local task is asked for
    (scanning its ~15k task YAMLs takes several seconds, so it is built once per process)."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_path=str(_resolved_dir()), include_defaults=include_defaults)


def load_tasks(tasks: list[str] | None) -> tuple[list[str], list]:
    """(cleaned task names, their lm-eval Task objects with the datasets already loaded), so that a typo or a
    dataset that cannot be downloaded fails before the model is loaded and prompts are generated. UsageError, one
    line, for an empty list, a missing lm-eval, an unknown name or a dataset that does not load."""
    names = list(dict.fromkeys(t.strip() for t in (tasks or []) if t and t.strip()))
    if not names:
        raise UsageError("--mc: give one or more lm-eval task names, comma-separated (e.g. bdclean_mc)")
    _require_lm_eval()
    local = local_tasks()
    tm = _task_manager(not all(n in local for n in names))
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(f"--mc: unknown lm-eval task {', '.join(map(repr, unknown))}; offline only "
                         f"{', '.join(local)} works (online, any lm-eval task such as arc_easy)")
    return names, _load_tasks(tm, names)


def check_tasks(tasks: list[str] | None) -> list[str]:
    """The cleaned task names, after load_tasks has checked that each exists and its dataset loads."""
    return load_tasks(tasks)[0]


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets log warnings and progress bars for every run; keep stderr for bdclean's own lines."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import datasets

        bars_were_on = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        bars_were_on = False
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if bars_were_on:
            datasets.utils.logging.enable_progress_bar()


def _load_tasks(tm, names: list[str]) -> list:
    """Build lm-eval Task objects (this fetches their datasets); a failure is one line naming the task."""
    built = []
    for name in names:
        try:
            with _quiet():
                loaded = tm.load([name])
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user gets one line either way
            first = str(e).splitlines()[0] if str(e) else ""
            offline = isinstance(e, ConnectionError) or any(
                w in first.lower() for w in ("offline", "reach", "connection", "resolve"))
            hint = (f"; offline only {', '.join(local_tasks())} works (with internet, set HF_HUB_OFFLINE=0 "
                    "so that its dataset can be downloaded)" if offline and name not in local_tasks() else "")
            raise UsageError(f"--mc: could not load the dataset of lm-eval task {name!r} "
                             f"({type(e).__name__}: {first}){hint}") from None
        built.extend(t for t in loaded["tasks"].values() if t not in built)
    return built


def run_mc(model, tok, tasks: list[str], limit: int | None, batch_size: int,
           loaded: tuple[list[str], list] | None = None) -> dict:
    """Zero-shot multiple-choice accuracy of an already-loaded HF model (a PeftModel works as is). ``loaded``:
    what load_tasks returned for ``tasks`` (evaluate.run loads them before the model); else they are loaded here.

    Returns ``{task: {"acc": float, "acc_norm": float | None, "n": int}}`` for every evaluated task
    (a group or tag name expands to its member tasks).
    """
    if limit is not None and limit < 1:
        raise UsageError("--limit must be >= 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    names, task_objs = loaded if loaded is not None else load_tasks(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tm = _task_manager(not all(n in local_tasks() for n in names))
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=task_objs, task_manager=tm, limit=limit,
                                      bootstrap_iters=0, log_samples=False)
    out: dict = {}
    for task, metrics in res["results"].items():
        if "acc,none" not in metrics:
            continue
        counts = res.get("n-samples") or {}
        n = counts.get(task, {}).get("effective")
        if n is None:  # a group: its members' counts
            n = sum(counts.get(t, {}).get("effective", 0) for t in res.get("group_subtasks", {}).get(task, []))
        acc_norm = metrics.get("acc_norm,none")
        out[task] = {"acc": float(metrics["acc,none"]), "acc_norm": None if acc_norm is None else float(acc_norm),
                     "n": int(n)}
    log("mc: " + ", ".join(f"{t} acc {100 * r['acc']:.1f}% (n={r['n']})" for t, r in out.items()))
    return out
