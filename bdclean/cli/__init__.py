"""The `bdclean` command line: the pipeline's commands (cli/pipeline.py), then the lab's (cli/lab.py), on the app
and helpers of cli/base.py. Heavy libraries are imported inside commands so `bdclean --help` is instant."""

from __future__ import annotations

import os
import sys

# isort: off
# importing a module registers its commands on the app: the pipeline's first, as `bdclean --help` lists them
from bdclean.cli import pipeline  # noqa: F401
from bdclean.cli import lab  # noqa: F401
# isort: on
from bdclean.cli.base import app
from bdclean.errors import EXIT_INTERRUPTED

__all__ = ["app", "main"]


def main() -> None:
    from bdclean.console import quiet_library_warnings

    quiet_library_warnings()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded from a model hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
