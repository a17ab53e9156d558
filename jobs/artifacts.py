"""The adapter registry from the shell: ``qlora-ray artifacts list|show|best`` (or ``python -m jobs.artifacts``).

    qlora-ray artifacts list [--registry LOCATION | --config PATH]
    qlora-ray artifacts show NAME [...]
    qlora-ray artifacts best [--base MODEL] [...]

The registry itself (``Registry``, manifests, the ``best`` pointers) is :mod:`qlora_ray.registry`.
"""

from __future__ import annotations

import argparse
import json
import numbers
import sys
from typing import Any

from qlora_ray import cli
from qlora_ray.config import RunConfig, load_config
from qlora_ray.registry import LIST_HINT, Entry, Registry, RegistryError, metric_of


def _print_list(registry: Registry) -> None:
    entries = registry.list()
    if not entries:
        print(f"(registry {registry.location} is empty)")
        return
    best = {p["name"] for p in registry.pointers().values()}
    rows = [["", "name", "base model", "r", "alpha", "lr", "val_loss", "created"]]
    rows += [_row(entry, entry.name in best) for entry in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(entries)} adapter(s) in {registry.location}; * = best for its base model")


def _row(entry: Entry, is_best: bool) -> list[str]:
    lora, training = entry.manifest.get("lora") or {}, entry.manifest.get("training") or {}
    val = metric_of(entry.manifest, "val_loss")
    return [
        "*" if is_best else "",
        entry.name,
        str(entry.manifest.get("base_model", "-")),
        str(lora.get("r", "-")),
        _number(lora.get("alpha")),
        _number(training.get("lr")),
        "-" if val is None else f"{val:.4f}",
        str(entry.manifest.get("created", "-")),
    ]


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, numbers.Real) else "-"


def _location(args: argparse.Namespace) -> str:
    if args.registry:
        return args.registry
    if args.config:
        return load_config(args.config, []).run.registry
    return RunConfig.model_fields["registry"].default


def main(argv: list[str] | None = None, prog: str = "python -m jobs.artifacts") -> int:
    where = argparse.ArgumentParser(add_help=False)
    group = where.add_mutually_exclusive_group()
    group.add_argument("--registry", help="registry directory or URI (default: run.registry's default)")
    group.add_argument("--config", help="YAML config whose run.registry to use")
    # -v after the subcommand too; SUPPRESS keeps the subcommand from resetting a -v given before it
    where.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = cli.parser(prog, cli.description(__doc__), config=False)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[where], help="list the registered adapters")
    show = commands.add_parser("show", parents=[where], help="print an adapter's manifest as JSON")
    show.add_argument("name")
    best = commands.add_parser("best", parents=[where], help="print the best adapter's name and location")
    best.add_argument("--base", help="base model (needed when the registry holds several)")
    args = parser.parse_args(argv)
    return cli.run(args, lambda: _command(args))


def _command(args: argparse.Namespace) -> None:
    registry = Registry(_location(args))
    try:
        if args.command == "list":
            _print_list(registry)
        elif args.command == "show":
            entry = registry.find(args.name)
            if entry is None:  # the registry's own error names no other adapter (Serve shows it to clients)
                known = ", ".join(e.name for e in registry.list()) or "none"
                raise RegistryError(f"no adapter named {args.name!r} in {registry.location} (known: {known})")
            print(json.dumps(entry.manifest, indent=2))
        else:
            entry = registry.best(args.base)
            if entry is None:
                wanted = f" for {args.base}" if args.base else ""
                raise RegistryError(f"no best adapter{wanted} in {registry.location}; {LIST_HINT}")
            print(entry.name)
            print(entry.uri)
    except OSError as err:
        raise RegistryError(f"registry {registry.location}: {err}") from None


if __name__ == "__main__":
    sys.exit(main())
