"""Reference log-probs computed once and cached on disk (spec §10.3).

The reference is frozen, so its summed log-probs of (y_ws, y_wt, y_l) are a function of the data, the weights
and the forward numerics only. Computing them once frees the reference model's memory during training and is
reused across α/β/learning-rate sweeps. The cache key hashes:

- the *tokenised* examples (prompt and response ids after truncation), which covers the data, the tokenizer,
  the chat template and the truncation settings;
- the reference weights and config (SHA-256 of ``config.json`` and every ``*.safetensors`` file; file hashes
  are memoised by path, size and modification time so a large model is hashed once);
- the dtype, the attention implementation and whether bf16 autocast was on.

Files: ``<cache>/wrpo-ref/<key>.safetensors`` (tensor ``ref_logps`` [N, 3], float32) and ``<key>.json``
(what went into the key), written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fuselab.utils.atomic import atomic_write_json
from fuselab.utils.hashing import sha256_file
from fuselab.utils.paths import cache_dir
from fuselab.utils.progress import progress
from fuselab.wrpo.data import WRPOCollator
from fuselab.wrpo.forward import forward_logps

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return cache_dir() / "wrpo-ref"


def _file_hash(path: Path, memo_dir: Path) -> str:
    st = path.stat()
    memo = memo_dir / "file-hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        table = json.loads(memo.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if key in table:
        return table[key]
    digest = sha256_file(path)
    table[key] = digest
    memo_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(memo, table)
    return digest


def model_fingerprint(model_dir: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 over the checkpoint's config and weight files (names and contents)."""
    model_dir = Path(model_dir)
    memo_dir = memo_dir or default_cache_dir()
    h = hashlib.sha256()
    files = sorted([model_dir / "config.json", *model_dir.glob("*.safetensors")])
    if len(files) < 2:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to fingerprint")
    for f in files:
        h.update(f.name.encode())
        h.update(_file_hash(f, memo_dir).encode())
    return h.hexdigest()


def data_fingerprint(examples: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex["prompt_ids"], ex["ws_ids"], ex["wt_ids"], ex["l_ids"]]).encode())
    return h.hexdigest()


def compute_ref_logps(
    model: Any,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int,
    device: Any = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """[N, 3] float32 summed log-probs of (ws, wt, l) under ``model`` (no grad), in example order."""
    collate = WRPOCollator(pad_token_id)
    out = torch.zeros((len(examples), 3), dtype=torch.float32)
    model.eval()
    dev = torch.device(device)
    for start in progress(range(0, len(examples), batch_size), desc="reference log-probs"):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out[start : start + len(chunk)] = forward_logps(model, batch).float().cpu()
    return out


def cached_ref_logps(
    examples: list[dict[str, Any]],
    model_dir: str | Path,
    *,
    load_model: Any,
    pad_token_id: int,
    batch_size: int,
    dtype: str,
    bf16: bool,
    device: Any = "cpu",
    cache: str | Path | None = None,
) -> tuple[torch.Tensor, str, bool]:
    """Reference log-probs for ``examples``: from the cache when the key matches, else computed and stored.

    ``load_model()`` is called only on a cache miss. Returns (log-probs [N, 3], key, was_cached).
    """
    from safetensors.torch import load_file, save_file

    root = Path(cache) if cache else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    parts = {
        "data": data_fingerprint(examples),
        "model": model_fingerprint(model_dir, root),
        "dtype": dtype,
        "bf16_autocast": bf16,
        "n": len(examples),
    }
    model = None
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    path = root / f"{key}.safetensors"
    if path.is_file():
        logps = load_file(path)["ref_logps"]
        if logps.shape == (len(examples), 3):
            log.info("reference log-probs: cache hit %s", path)
            return logps, key, True
    model = load_model()
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    logps = compute_ref_logps(model, examples, pad_token_id, batch_size, device, bf16)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"ref_logps": logps.contiguous()}, str(tmp))
    os.replace(tmp, path)
    atomic_write_json(
        root / f"{key}.json", {**parts, "model_dir": str(model_dir), "attn_implementation": attn}
    )
    del model
    return logps, key, False
