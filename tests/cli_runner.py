"""The CLI tests' way to run a command: in-process through click, never a traceback for the user."""

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from retrieval import cli


def clipfind(*args):
    """Run `clipfind ARGS` in-process; a traceback in its output fails the test at once."""
    result = CliRunner().invoke(cli.cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


ROOT = Path(__file__).resolve().parents[1]


def fresh_clipfind(*args: str, watch: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`clipfind ARGS` in a fresh process: (the finished process, which of the `watch` modules it imported).

    Reported at exit either way: a finished search leaves by os._exit, skipping atexit."""
    code = ("import sys, atexit, json, os\n"
            f"report = lambda: print('HEAVY=' + json.dumps([m for m in {watch!r} if m in sys.modules]), "
            "file=sys.stderr, flush=True)\n"
            "atexit.register(report)\n"
            "fast_exit = os._exit\n"
            "os._exit = lambda code: (report(), fast_exit(code))\n"
            "from retrieval.cli import main\n"
            f"sys.argv = ['clipfind', *{list(args)!r}]\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    heavy = [line for line in out.stderr.splitlines() if line.startswith("HEAVY=")]
    assert out.returncode == 0 and heavy, out.stderr
    return out, json.loads(heavy[-1][len("HEAVY="):])
