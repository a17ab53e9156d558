"""The ``qlora-ray`` command: one entry point for every stage.

    qlora-ray preflight|train|sweep|evaluate|serve|pipeline --config PATH [key=value ...] [-v]
    qlora-ray artifacts list|show|best [...]

Each command is the same as its ``python -m`` form (``qlora-ray train`` is ``python -m jobs.train``): same
flags, same overrides, same output. Like the pipeline, this module is a composition root: it may reach every
stage. It imports a stage only when that command runs, so ``qlora-ray --help`` and ``qlora-ray artifacts``
start without loading torch, Ray Train or Ray Serve.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qlora_ray.cli import Parser, add_verbose

# command: (module whose main(argv, prog) runs it, what it does)
COMMANDS = {
    "preflight": ("jobs.preflight", "check data, LoRA targets, memory and steps; load no weights"),
    "train": ("jobs.train", "fine-tune once on Ray Train and export the adapter"),
    "sweep": ("tune.sweep", "sweep LoRA rank and learning rate on Ray Tune and register the best adapter"),
    "evaluate": ("jobs.evaluate", "score an adapter against its base on the holdout split"),
    "serve": ("serve.__main__", "deploy the OpenAI-compatible Serve app"),
    "pipeline": ("jobs.pipeline", "preflight, sweep or train, evaluate, deploy and query, resumable by stage"),
    "artifacts": ("jobs.artifacts", "list, show or pick the best adapter of the registry"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(
        prog="qlora-ray",
        description="QLoRA fine-tuning, sweeps and serving on Ray.",
        epilog="commands:\n" + "\n".join(f"  {name:<10} {about}" for name, (_, about) in COMMANDS.items())
        + "\n\nqlora-ray COMMAND --help shows a command's flags.",
        formatter_class=_RawEpilog,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND", help="what to run (see below)")
    parser.add_argument("args", nargs="...", help="the command's flags and key=value overrides")
    add_verbose(parser)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    rest = ["--verbose", *args.args] if args.verbose else args.args  # before a subcommand (artifacts list)
    return module.main(rest, prog=f"qlora-ray {args.command}")


class _RawEpilog(argparse.RawDescriptionHelpFormatter):
    """Keeps the command list's line breaks."""


if __name__ == "__main__":
    sys.exit(main())
