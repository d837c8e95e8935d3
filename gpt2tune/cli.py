"""The `gpt2tune` command line: a thin layer over the tasks (one module per command
in `gpt2tune.commands`).

User errors print one line and exit with code 2 (`--debug` shows the traceback);
Ctrl-C exits with 130 after saving what can be saved.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gpt2tune import __version__
from gpt2tune.commands import COMMANDS
from gpt2tune.errors import UserError

EPILOG = "Docs: README.md. Recipes: recipes/*.yaml. Exit codes: 0 ok, 2 user error, 130 interrupted."


def _modules():
    return {name: importlib.import_module(f"gpt2tune.commands.{name.replace('-', '_')}") for name in COMMANDS}


def build_parser(modules=None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpt2tune", description="Fine-tune GPT-2-family models and use them.",
                                 epilog=EPILOG)
    ap.add_argument("--version", action="version", version=f"gpt2tune {__version__}")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (modules or _modules()).values():
        mod.add_parser(sub)
    return ap


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    modules = _modules()
    ap = build_parser(modules)
    a = ap.parse_args(argv)
    try:
        return modules[a.command].run(a)
    except UserError as err:
        if a.debug:
            raise
        print(f"gpt2tune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2tune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001
        from gpt2tune.train.loop import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):
            print(f"gpt2tune: {err}", file=sys.stderr)
            return 130
        raise
