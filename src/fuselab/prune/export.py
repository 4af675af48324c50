"""Write a real pruned checkpoint: the weights of removed blocks are absent from the files.

The format follows from what was removed (spec §7.4):

- **whole layers only** (``stock``): the layers are dropped and the rest renumbered, ``num_hidden_layers`` and
  every per-layer config field (``layer_types``, ``no_rope_layers``, ``max_window_layers``, ...) follow the
  kept layers. Stock ``AutoModelForCausalLM`` loads it.
- **single attention or MLP blocks** (``fuselab``): whole layers are dropped as above; the remaining
  partial layers keep only the weights they use. ``config.json`` carries a ``fuselab_block_pruning`` section
  (the stock base config plus the removed modules) and a model type of its own, so stock transformers refuses
  to load it instead of silently filling the missing weights with random values. Load it with
  :func:`fuselab.prune.loading.load_pruned_model`.
- **DeciLM / Nemotron-NAS** (``decilm``), for Llama-family models whose MLP width is a multiple of 256: the
  same files, but ``config.json`` is a ``DeciLMForCausalLM`` config with per-layer ``block_configs``
  (``attention.no_op`` / ``ffn.no_op``, and the null ``n_heads_in_group`` / ``ffn_mult`` that llama.cpp's
  converter reads), the format vLLM's ``DeciLMForCausalLM`` builds no-op sublayers from. fuselab loads it too.

Weights are streamed from the source checkpoint tensor by tensor (bitwise copies in the source dtype), never
materialised as a whole model.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuselab.modeling.checkpoint import Checkpoint
from fuselab.modeling.writer import ShardedSafetensorsWriter, TensorSpec
from fuselab.prune.blocks import Block, BlockLayout
from fuselab.utils.errors import ConfigError, IncompatibleModelsError

FORMAT_KEY = "fuselab_block_pruning"
FUSELAB_MODEL_TYPE = "fuselab_blockpruned"
INDEX_LIST_KEYS = ("mlp_only_layers",)  # lists of layer indices (remapped, not subset)
COUNT_KEYS = ("max_window_layers", "first_k_dense_replace")  # "the first N layers" (recounted)
_SKIP_FILES = re.compile(r"(\.safetensors|\.bin|\.safetensors\.index\.json|\.bin\.index\.json)$")
_OWN_FILES = {"config.json", "README.md", "fuselab_model.json", "configuration_decilm.py"}


@dataclass
class ExportInfo:
    format: str  # "stock" | "fuselab" | "decilm"
    kept_layers: list[int]  # original index of each layer in the output
    partial: list[tuple[int, str]]  # (output layer index, "attn" | "mlp") removed inside kept layers
    num_tensors: int = 0
    files: list[str] = field(default_factory=list)
    decilm_note: str = ""


def _text_config(cfg: Any) -> Any:
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def drop_layers_from_config(cfg: Any, kept: list[int]) -> Any:
    """A copy of ``cfg`` describing only the layers ``kept`` (original indices, ascending)."""
    cfg = copy.deepcopy(cfg)
    text = _text_config(cfg)
    n = text.num_hidden_layers
    new_index = {old: new for new, old in enumerate(kept)}
    for key, value in list(vars(text).items()):
        if key in INDEX_LIST_KEYS and isinstance(value, list):
            setattr(text, key, [new_index[i] for i in value if i in new_index])
        elif key in COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
            setattr(text, key, sum(1 for i in kept if i < value))
        elif "layer" in key and isinstance(value, (list, tuple)) and len(value) == n:
            setattr(text, key, type(value)(value[i] for i in kept))
    text.num_hidden_layers = len(kept)
    return cfg


def decilm_problem(cfg: Any, layout: BlockLayout) -> str | None:
    """Why the DeciLM ``block_configs`` format cannot express this model (None when it can)."""
    text = _text_config(cfg)
    if text.model_type not in ("llama", "mistral"):
        return f"model type {text.model_type!r} is not Llama-family"
    if getattr(text, "sliding_window", None) is not None and text.model_type == "mistral":
        return "sliding-window attention is not part of the DeciLM format"
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        return "the model has attention or MLP biases"
    if getattr(text, "hidden_act", "silu") != "silu":
        return f"activation {text.hidden_act!r} is not SwiGLU/silu"
    first = layout.layers[0]
    if (first.attn, first.mlp, first.attn_norms, first.mlp_norms) != (
        "self_attn",
        "mlp",
        ("input_layernorm",),
        ("post_attention_layernorm",),
    ):
        return "the layer layout differs from Llama's"
    if text.intermediate_size % 256:
        return (
            f"intermediate_size {text.intermediate_size} is not a multiple of 256, so no DeciLM ffn_mult "
            "(round_up(int(2*ffn_mult*hidden/3), 256)) gives it"
        )
    return None


def _ffn_mult(intermediate: int, hidden: int) -> float:
    mult = 1.5 * intermediate / hidden
    got = int(2 * mult * hidden / 3)
    assert got + (-got % 256) == intermediate, (intermediate, hidden, mult)
    return mult


def decilm_config(base: dict[str, Any], partial: list[tuple[int, str]], num_layers: int) -> dict[str, Any]:
    """The DeciLM / Nemotron-NAS config for a Llama-family ``base`` config dict."""
    group = base["num_attention_heads"] // (base.get("num_key_value_heads") or base["num_attention_heads"])
    mult = _ffn_mult(base["intermediate_size"], base["hidden_size"])
    no_attn = {i for i, k in partial if k == "attn"}
    no_ffn = {i for i, k in partial if k == "mlp"}
    blocks = [
        {
            "attention": {
                "no_op": i in no_attn,
                "replace_with_linear": False,
                "n_heads_in_group": None if i in no_attn else group,
            },
            "ffn": {
                "no_op": i in no_ffn,
                "replace_with_linear": False,
                "ffn_mult": None if i in no_ffn else mult,
            },
        }
        for i in range(num_layers)
    ]
    out = {k: v for k, v in base.items() if k not in ("architectures", "model_type", "auto_map")}
    rope = base.get("rope_parameters") or {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            out["rope_scaling"] = dict(rope)
    out.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        block_configs=blocks,
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
    )
    return out


def _plan_names(
    ckpt: Checkpoint, layout: BlockLayout, whole: set[int], removed_modules: dict[int, set[str]]
) -> list[tuple[str, str]]:
    """(source name, output name) of every tensor kept."""
    prefix = layout.layers_path + "."
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.([^.]+)\.(.+)$")
    kept = [i for i in range(layout.num_layers) if i not in whole]
    new_index = {old: new for new, old in enumerate(kept)}
    plan = []
    seen_layers = set()
    for name in ckpt.tensors:
        if not name.startswith(prefix):
            plan.append((name, name))
            continue
        m = pattern.match(name)
        if not m:
            raise IncompatibleModelsError(f"cannot read the layer of checkpoint tensor {name}")
        i, child, rest = int(m.group(1)), m.group(2), m.group(3)
        seen_layers.add(i)
        if i in whole or child in removed_modules.get(i, ()):
            continue
        plan.append((name, f"{prefix}{new_index[i]}.{child}.{rest}"))
    if seen_layers != set(range(layout.num_layers)):
        raise IncompatibleModelsError(
            f"{ckpt.path}: the checkpoint's tensor names do not follow the model's module names "
            f"({layout.layers_path}.N...); this checkpoint cannot be pruned by name"
        )
    return plan


def copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer, chat template, generation config and any other non-weight file of the source."""
    for f in source.iterdir():
        if f.is_file() and not _SKIP_FILES.search(f.name) and f.name not in _OWN_FILES:
            shutil.copy2(f, out / f.name)


def export_pruned(
    source: Path,
    out: Path,
    config: Any,
    layout: BlockLayout,
    removed: set[Block],
    decilm: str = "auto",
    max_shard_bytes: int = 2 * 10**9,
) -> ExportInfo:
    """Write the pruned checkpoint of ``source`` without ``removed`` into the existing folder ``out``."""
    by_layer: dict[int, set[str]] = {}
    for b in removed:
        by_layer.setdefault(b.layer, set()).add(b.kind)
    whole = {i for i, kinds in by_layer.items() if kinds == {"attn", "mlp"}}
    kept = [i for i in range(layout.num_layers) if i not in whole]
    new_index = {old: new for new, old in enumerate(kept)}
    partial = sorted((new_index[i], k) for i, kinds in by_layer.items() if i not in whole for k in kinds)
    removed_modules = {
        i: {n for k in kinds for n in layout.layers[i].module_names(k)}
        for i, kinds in by_layer.items()
        if i not in whole
    }
    base_cfg = drop_layers_from_config(config, kept)
    info = ExportInfo(format="stock", kept_layers=kept, partial=partial)
    if partial:
        problem = decilm_problem(base_cfg, layout)
        if decilm == "always" and problem:
            raise ConfigError(f"export.decilm is `always` but the DeciLM format does not fit: {problem}")
        info.format = "decilm" if decilm != "never" and problem is None else "fuselab"
        info.decilm_note = problem or ""
    with Checkpoint(source) as ckpt:
        plan = _plan_names(ckpt, layout, whole, removed_modules)
        specs = [TensorSpec(dst, ckpt.tensors[src].dtype, ckpt.tensors[src].shape) for src, dst in plan]
        writer = ShardedSafetensorsWriter(out, specs, max_shard_bytes)
        try:
            for src, dst in plan:
                writer.write(dst, ckpt.read(src))
        except BaseException:
            writer.abort()
            raise
        info.files = writer.finish()
        info.num_tensors = len(plan)
    copy_side_files(source, out)
    if info.format == "stock":
        base_cfg.save_pretrained(out)
        return info
    base = base_cfg.to_dict()
    section = {
        "format_version": 1,
        "base_config": base,
        "layers_path": layout.layers_path,
        "source_layers": kept,
        "removed": [
            {
                "layer": new,
                "kind": kind,
                "modules": list(layout.layers[kept[new]].module_names(kind)),
                "output_tuple_len": (
                    layout.layers[kept[new]].attn_output
                    if kind == "attn"
                    else layout.layers[kept[new]].mlp_output
                ).tuple_len,
            }
            for new, kind in partial
        ],
    }
    if info.format == "decilm":
        top = decilm_config(base, partial, len(kept))
        shutil.copy2(Path(__file__).with_name("configuration_decilm.py"), out / "configuration_decilm.py")
    else:
        top = {k: v for k, v in base.items() if k not in ("auto_map",)}
        top.update(model_type=FUSELAB_MODEL_TYPE, architectures=["FuselabBlockPrunedForCausalLM"])
    top[FORMAT_KEY] = section
    (out / "config.json").write_text(json.dumps(top, indent=2) + "\n")
    return info
