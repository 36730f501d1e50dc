import os

import pytest

from tests.common import make_adapter, make_tiny_llama, tiny_rows, write_rows

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory):
    return make_adapter(tiny_base, tmp_path_factory.mktemp("tiny_adapter") / "adapter")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "clean.jsonl", tiny_rows(60))


@pytest.fixture()
def run_cli():
    """Invoke the CLI in-process; returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from bdclean.cli import app

    def run(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        return r.exit_code, r.stdout, r.stderr

    return run
