"""The ``permsparse`` command line: ``prune`` a model, ``eval`` a model or checkpoint, ``check`` a checkpoint,
``report`` on checkpoints.

The ``prune`` flags are built from the config dataclasses (:mod:`permsparse.config`): each field's flag,
type, choices, help and default come from the field itself, so nothing here restates them. Arguments are
parsed, and refused, before anything heavy is imported (torch, transformers): the commands themselves run
in :mod:`permsparse.cli.commands` (:mod:`.arguments` builds the parsers; :mod:`.limits` holds what a command checks before heavy work).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .arguments import add_check, add_eval, add_prune, add_report, add_speed, config_from_args

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="permsparse", description=__doc__.splitlines()[0])
    from ..run.version import package_version

    parser.add_argument("--version", action="version", version=package_version())
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    add_prune(sub)
    add_eval(sub)
    add_check(sub)
    add_report(sub)
    add_speed(sub, full=argv[:1] == ["speed"])
    args = parser.parse_args(argv)
    args.command_line = "permsparse " + shlex.join(argv)
    try:
        if args.command == "prune":
            args.config = config_from_args(args)  # refused here, before torch and transformers are imported
        from . import commands

        return commands.run(args)
    except MemoryError as err:
        print(f"permsparse: error: out of memory: {err or 'lower --batch, --seqlen or --nsamples'}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unwritable or full disk, a file that vanished: named, progress kept
        from .commands import describe_os_error, kept

        print(f"permsparse: error: {describe_os_error(err)}{kept(args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("permsparse: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
