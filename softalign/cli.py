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

#: (command, module providing ``add_subcommand``)
SUBCOMMANDS = (
    ("cache", "softalign.commands.cache"),
    ("train", "softalign.commands.train"),
    ("encode", "softalign.commands.encode"),
    ("eval", "softalign.commands.eval"),
    ("demo", "softalign.train.demo"),
)


EXIT_CODES = """\
exit status:
  0  success
  1  an error in the input, the data or the environment (bad file, flag or recipe value, a cache or
     checkpoint that does not match, a locked directory, disk full, ...): one line on stderr names it
     (set SOFTALIGN_TRACEBACK=1 for the full traceback)
  2  a usage error: unknown command or flag, missing argument (argparse)
"""

EXIT_CODES_SHORT = (
    "exit status: 0 success; 1 an error in the input, data or environment (one line on stderr, "
    "SOFTALIGN_TRACEBACK=1 for the traceback); 2 a usage error (argparse)"
)

#: exceptions that mean "bad input or environment": one line on stderr and exit status 1
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, FloatingPointError, RuntimeError, ImportError)


def format_error(err: BaseException) -> str:
    """One line for a user-facing error; OSErrors say what happened to which file in plain words."""
    import errno

    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno is not None:
        where = f" {err.filename}" if err.filename else ""
        if err.errno == errno.ENOSPC:
            return (
                f"disk full while writing{where or ' the output'}: free some space and rerun (finished work is kept)"
            )
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write{where}: permission denied or read-only file system; choose a writable directory"
        return f"{err.strerror or err}{':' + where if where else ''}"
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softalign",
        description="Soft-label alignment for image-text retrieval: build teacher caches, "
        "train from recipes, evaluate cross-modal and uni-modal retrieval.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{cache,train,encode,eval,demo}")
    for name, module in SUBCOMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # a subcommand whose optional dependencies are missing
            p = sub.add_parser(name, help=f"(unavailable: {err})")
            p.set_defaults(func=_unavailable(name, err))
            continue
        mod.add_subcommand(sub)
    _document_exit_codes(parser)
    return parser


def _document_exit_codes(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """Append the exit-status convention to the help of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                raw = issubclass(p.formatter_class, argparse.RawDescriptionHelpFormatter)
                p.epilog = ((p.epilog + "\n") if p.epilog else "") + (EXIT_CODES if raw else EXIT_CODES_SHORT)
                _document_exit_codes(p, top=False)


#: the extra that brings a command's dependencies (pyproject.toml)
EXTRAS = {"cache": "cache", "train": "train", "encode": "train", "eval": "eval", "demo": "train,offline"}


def missing_dependency_message(command: str, err: ImportError) -> str:
    """One line naming the missing module and the extra that installs it."""
    module = getattr(err, "name", None) or str(err)
    extra = EXTRAS.get(command, "all")
    return (
        f"softalign {command} needs the '{extra}' extra (missing module: {module}): pip install 'softalign[{extra}]'"
    )


def _unavailable(name, err):
    def run(args):
        raise SystemExit(
            missing_dependency_message(name, err)
            if isinstance(err, ModuleNotFoundError)
            else f"softalign {name} is unavailable: {err}"
        )

    return run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = argv  # the command line, for messages that say how to rerun it
    try:
        result = args.func(args)
        sys.stdout.flush()  # here, so that a reader that left is handled below and not at interpreter exit
    except BrokenPipeError:  # the reader left (`| head`, `| grep -q`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except ModuleNotFoundError as err:
        if os.environ.get("SOFTALIGN_TRACEBACK") or not err.name or err.name.split(".")[0] == "softalign":
            raise
        print(missing_dependency_message(args.command, err), file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        # bad input: one line that names the problem (set SOFTALIGN_TRACEBACK=1 for the full traceback)
        if os.environ.get("SOFTALIGN_TRACEBACK"):
            raise
        print(f"softalign {args.command}: error: {format_error(err)}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
