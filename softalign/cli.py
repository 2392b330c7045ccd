"""``softalign`` command line: ``softalign cache | train | eval | demo``.

Each subcommand lives next to the code it drives and exposes ``add_subcommand(subparsers)``,
which registers an argparse parser whose ``func`` default runs it. Sub-modules are imported
when the parser is built, so they keep heavy imports (torch models, datasets) inside ``run``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

#: (command, module providing ``add_subcommand``)
SUBCOMMANDS = (
    ("cache", "softalign.teachers.cli"),
    ("train", "softalign.train.cli"),
    ("eval", "softalign.eval.cli"),
    ("demo", "softalign.train.demo"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softalign",
        description="Soft-label alignment for image-text retrieval: build teacher caches, "
        "train from recipes, evaluate cross-modal and uni-modal retrieval.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{cache,train,eval,demo}")
    for name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # a subcommand whose optional dependencies are missing
            p = sub.add_parser(name, help=f"(unavailable: {err})")
            p.set_defaults(func=_unavailable(name, err))
            continue
        mod.add_subcommand(sub)
    return parser


def _unavailable(name, err):
    def run(args):
        raise SystemExit(f"softalign {name} is unavailable: {err}")

    return run


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, TypeError, KeyError) as err:
        # bad input: one line that names the problem (set SOFTALIGN_TRACEBACK=1 for the full traceback)
        if os.environ.get("SOFTALIGN_TRACEBACK"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"softalign {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
