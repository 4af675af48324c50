"""The one command line: ``fuselab <command>``.

Each stage contributes its sub-commands through an ``add_parser(subparsers)`` function in its own
``commands`` module; those modules import heavy libraries (torch, transformers) only inside the handlers,
so ``fuselab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from fuselab import __version__
from fuselab.utils.errors import FuselabError

# Stage modules that contribute sub-commands, in the order ``fuselab --help`` lists them.
COMMAND_MODULES = (
    "fuselab.modeling.commands",
    "fuselab.merge.commands",
    "fuselab.fusion.commands",
    "fuselab.wrpo.commands",
    "fuselab.prune.commands",
    "fuselab.pipelines.commands",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="fuselab",
        description="Fuse several LLMs into one: knowledge fusion, parameter merging, WRPO and block pruning.",
    )
    parser.add_argument("--version", action="version", version=f"fuselab {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fuselab.utils.progress import silence_other_bars

    silence_other_bars()
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if getattr(args, "command", None) not in (None, "models", "info"):
        from fuselab.utils.hardware import configure_threads

        configure_threads()  # torch's threads = the cores this process may use (affinity, cgroup quota)
    from fuselab.utils.atomic import Terminated, release_all_outputs, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # SIGTERM (a scheduler, `kill`) cleans up as Ctrl-C does
            return int(args.handler(args) or 0)
    except FuselabError as err:
        if os.environ.get("FUSELAB_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # the one boundary for what the OS or a library raises deep in a stage
        from fuselab.utils.boundary import explain

        message = explain(err, args)
        if message is None or os.environ.get("FUSELAB_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}; nothing that looks finished was left behind", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        release_all_outputs()


if __name__ == "__main__":
    raise SystemExit(main())
