"""One stderr console for logs and progress; stdout is left for machine-readable output."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console

# soft_wrap: a log line is never broken at the console width (when stderr is not a terminal rich assumes 80
# columns, and would cut lines inside paths that scripts and people then copy)
console = Console(stderr=True, highlight=False, soft_wrap=True)

# how much a command says on stderr (`--quiet` / `--verbose` on every command, cli/base.py): quiet = errors,
# warnings and the command's last line (its result) only, no progress; verbose = also library warnings and debug
# lines. The environment variable carries the level into worker processes.
VERBOSITY_ENV = "BDCLEAN_VERBOSITY"
QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
_held: list = []  # quiet: the last log line so far, shown when the command ends (release_result)


def verbosity() -> str:
    import os

    v = os.environ.get(VERBOSITY_ENV, NORMAL)
    return v if v in (QUIET, NORMAL, VERBOSE) else NORMAL


def set_verbosity(level: str) -> None:
    import os
    import warnings

    _held.clear()
    if level == NORMAL:
        os.environ.pop(VERBOSITY_ENV, None)
    else:
        os.environ[VERBOSITY_ENV] = level
    if level == VERBOSE:  # every library warning, once per place (the CLI silenced some before parsing)
        warnings.simplefilter("default")
    else:
        quiet_library_warnings()


def release_result() -> None:
    """quiet: print the command's last log line, its result (the other lines were held back and dropped)."""
    if _held:
        console.print(_held.pop())
    _held.clear()


def quiet_library_warnings() -> None:
    """Silence library notices a user cannot act on (in the CLI and in its worker processes): deprecations, and
    PEFT's "base_model_name_or_path was renamed" UserWarning (a LoRA config naming another path than the base
    loaded: twice per twin in train-pairs). ``--verbose`` shows them."""
    import warnings

    if verbosity() == VERBOSE:
        return
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.* was renamed", category=UserWarning)


@contextlib.contextmanager
def quiet_library_output():
    """Silence Python warnings and transformers' logging (PEFT's UserWarnings name site-packages paths,
    transformers' load report prints tables with terminal codes) while library code runs on bdclean's behalf:
    what the user needs to know, bdclean says itself."""
    import warnings

    from transformers.utils import logging as hf_logging

    if verbosity() == VERBOSE:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), 0x7f, *range(0x80, 0xa0))}


def printable(msg: str) -> str:
    """``msg`` with every control character (terminal escapes, newlines, carriage returns) written as \\xNN: a
    message quotes names and text from hostile files, which must neither drive the user's terminal nor break the
    one-line rule. Tensor and module names are also quoted where they appear (io.headers.quote)."""
    return msg.translate(_CONTROLS)


def log(msg: str, style: str | None = None) -> None:
    """One log line on stderr. ``msg`` is plain text (paths or values with [brackets] are not read as markup, control
    characters are escaped); ``style`` colours it (e.g. "yellow" for warnings)."""
    from rich.text import Text

    line = Text.assemble(("bdclean", "dim"), " ", (printable(msg), style or ""))
    if verbosity() == QUIET and style not in WARNING_STYLES:
        _held[:] = [line]  # only the last line of a command is its result
        return
    console.print(line)


WARNING_STYLES = ("yellow", "red", "bold red")  # log lines --quiet still shows


def debug(msg: str) -> None:
    """A log line shown with --verbose only."""
    if verbosity() == VERBOSE:
        log(f"debug: {msg}", style="dim")


class LineProgress:
    """Progress for logs and pipes (no terminal): one line per task each time it passes another 10 %."""

    def __init__(self):
        self.tasks: dict[int, dict] = {}
        self._next = 0  # task ids are never reused, so a removed task's id cannot name a newer one

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        tid, self._next = self._next, self._next + 1
        self.tasks[tid] = {"d": description, "total": total or 0, "done": 0.0, "shown": -1, "t0": time.time()}
        return tid

    def update(self, tid: int, completed: float | None = None, advance: float | None = None,
               description: str | None = None, total: float | None = None, **_) -> None:
        t = self.tasks.get(tid)
        if t is None:
            return
        if total is not None:
            t["total"] = total
        if description:
            t["d"] = description
        if completed is not None:
            t["done"] = completed
        if advance:
            t["done"] += advance
        if t["total"]:
            decile = int(10 * t["done"] / t["total"])
            if decile > t["shown"]:
                t["shown"] = decile
                el = time.time() - t["t0"]
                eta = el / t["done"] * (t["total"] - t["done"]) if t["done"] else float("nan")
                log(f"{t['d'].strip()}: {t['done']:.0f}/{t['total']:.0f} ({el:.0f} s, eta {eta:.0f} s)")

    def remove_task(self, tid: int) -> None:
        self.tasks.pop(tid, None)


class _NoProgress(LineProgress):
    """--quiet: progress that shows nothing."""

    def update(self, *a, **k) -> None:
        pass


def progress():
    if verbosity() == QUIET:
        return _NoProgress()
    if not console.is_terminal:
        return LineProgress()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
