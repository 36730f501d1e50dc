"""What every `bdclean` command shares: the app, `guarded` (one line and an exit code for every failure), the
common options and their parsers. The pipeline's commands (cli/pipeline.py) and the lab's (cli/lab.py) both import
it; it imports neither."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path

import typer
from typer.core import TyperGroup

from bdclean.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_TERMINATED, BdcleanError, Terminated, UsageError


def _fail(msg: str, code: int) -> None:
    from rich.text import Text

    from bdclean.console import console, printable

    # plain text: a message quoting user input such as '[/x]' must not be parsed as markup, nor its control
    # characters reach the terminal
    console.print(Text.assemble(("error:", "bold red"), " ", printable(msg)), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# click's UsageError, whether typer vendors click (0.29+) or uses the click package
_CLICK_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


@contextlib.contextmanager
def _one_line_usage():
    try:
        yield
    except _CLICK_USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `bdclean` alone shows the help, as intended
            raise
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "bdclean"
        _fail(f"{e.format_message()} (see `{where} --help`)", e.exit_code)


def _no_flag_metavars(group) -> None:
    """A flag takes no value, but typer's help shows one (`--force <bool>`): give flags an empty metavar, the
    --help option (which click makes per context) included."""

    def blank(param):
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        return param

    for cmd in [group, *group.commands.values()]:
        for param in cmd.params:
            blank(param)
        if not getattr(cmd, "_bdclean_help", False):
            make_help = cmd.get_help_option
            cmd.get_help_option = lambda ctx, make_help=make_help: blank(make_help(ctx))
            cmd._bdclean_help = True


class _OneLineUsageGroup(TyperGroup):
    """A bad flag or a missing option gets one line and exit 2, like every other error (click's default is a
    usage box of five lines)."""

    def make_context(self, *a, **k):
        _no_flag_metavars(self)
        with _one_line_usage():
            return super().make_context(*a, **k)

    def invoke(self, ctx):
        with _one_line_usage():
            return super().invoke(ctx)


app = typer.Typer(
    cls=_OneLineUsageGroup,
    help="Remove backdoors from instruction-tuned LLMs without knowing the trigger.\n\n"
    "Example: bdclean purify suspicious_adapter/ --clean alpaca.jsonl --out runs/x",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        from bdclean import __version__

        typer.echo(f"bdclean {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="print the version and exit")):
    pass


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises Terminated in the main thread for the command's duration (the previous handler comes back
    after). Python's default for SIGTERM is to die at once, leaving worker processes training and temporary
    files behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


QUIET = typer.Option(False, "--quiet", "-q", help="errors, warnings and the result line only; no progress")
VERBOSE = typer.Option(False, "--verbose", "-v", help="also library warnings and debug lines")


def _verbosity(quiet: bool, verbose: bool) -> str:
    from bdclean.console import NORMAL
    from bdclean.console import QUIET as Q
    from bdclean.console import VERBOSE as V

    if quiet and verbose:
        raise UsageError("--quiet and --verbose exclude each other; give one")
    return Q if quiet else V if verbose else NORMAL


def guarded(fn):
    """One clear line and a documented exit code for every failure; a traceback only with BDCLEAN_DEBUG=1.

    Every command gets --quiet and --verbose here (its signature does not restate them): they set the console's
    verbosity for the command's duration."""

    @functools.wraps(fn)
    def wrapper(*a, quiet: bool = False, verbose: bool = False, **k):
        from bdclean.console import NORMAL, release_result, set_verbosity

        try:
            set_verbosity(_verbosity(quiet, verbose))
            with _sigterm_as_interrupt():
                result = fn(*a, **k)
            release_result()
            return result
        except typer.Exit:
            raise
        except Terminated:
            _fail("terminated (SIGTERM); finished artifacts are kept and a rerun resumes", EXIT_TERMINATED)
        except KeyboardInterrupt:
            _fail("interrupted; finished artifacts are kept and a rerun resumes", EXIT_INTERRUPTED)
        except BdcleanError as e:
            _fail(str(e), e.exit_code)
        except MemoryError:
            _fail("out of memory", EXIT_RUNTIME)
        except OSError as e:
            if os.environ.get("BDCLEAN_DEBUG"):
                raise
            _fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", EXIT_RUNTIME)
        except Exception as e:  # noqa: BLE001 - last resort: still one line, never a traceback
            if os.environ.get("BDCLEAN_DEBUG"):
                raise
            _fail(f"unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  "(rerun with BDCLEAN_DEBUG=1 for a traceback)", EXIT_RUNTIME)
        finally:
            set_verbosity(NORMAL)

    sig = inspect.signature(fn, eval_str=True)
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=bool)
             for n, d in (("quiet", QUIET), ("verbose", VERBOSE))]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "quiet": bool, "verbose": bool}
    return wrapper


def nonempty_path(value: str) -> Path:
    # Path("") is Path("."): an empty --out would silently mean the current directory
    if value == "":
        raise typer.BadParameter("must not be empty")
    return Path(value)


def nonempty_name(value: str) -> str:
    # an empty --base would read as "unset" and silently become the smollm2 alias
    if value == "":
        raise typer.BadParameter("must not be empty (give a model directory or 'smollm2')")
    return value


OUT = typer.Option(..., "--out", "-o", parser=nonempty_path, metavar="<path>",
                   help="run folder holding one sub-folder per stage")
CONFIG = typer.Option(None, "--config", "-c", help="YAML file with options (CLI flags override it)")
FORCE = typer.Option(False, "--force", help="recompute even if the stage is up to date")
BASE = typer.Option(None, "--base", parser=nonempty_name,
                    help="base model: an HF model directory or the alias 'smollm2' (default)")


def placed(device: str | None, dtype: str | None, gradient_checkpointing: bool | None = None):
    """The command's placement, resolved now (a bad --device/--dtype is one line, exit 2, before any work), as a
    context manager for the command's duration (train/device.py)."""
    from bdclean.train import device as dev

    return dev.use(dev.resolve(device, dtype, bool(gradient_checkpointing)))
