"""The CLI tests' way to run a command: in-process through click, never a traceback for the user."""

from click.testing import CliRunner

from retrieval import cli


def clipfind(*args):
    """Run `clipfind ARGS` in-process; a traceback in its output fails the test at once."""
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result
