"""Errors that reach the user as one line on stderr and a documented exit code."""

EXIT_RUNTIME = 1  # the input was well-formed but the work could not be done (bad weights, I/O failure...)
EXIT_USAGE = 2  # bad options or malformed input files
EXIT_INTERRUPTED = 130  # Ctrl-C, or SIGINT sent to the main process
EXIT_TERMINATED = 143  # SIGTERM (what Slurm, systemd and Kubernetes send): 128 + 15, as a shell reports it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every cleanup path for Ctrl-C (workers stopped,
    temporary files removed, finished artifacts kept) runs for it too."""


class BdcleanError(Exception):
    """An error with a message meant for the user. Never shown with a traceback."""

    exit_code = EXIT_RUNTIME


class UsageError(BdcleanError):
    """Bad option values, malformed data files or model directories."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """An input file or directory is missing, malformed or refused (e.g. pickle weights)."""


def require(cond: bool, message: str, kind: type[BdcleanError] = UsageError) -> None:
    """Argument check that survives ``python -O`` (unlike ``assert``)."""
    if not cond:
        raise kind(message)


def at_least(option: str, value: float | None, minimum: float = 1) -> None:
    """A numeric option below its minimum is a usage error (``None`` = unset, allowed)."""
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be at least {minimum} (got {value})")
