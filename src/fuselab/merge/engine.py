"""The streaming merge engine: one tensor at a time from any number of inputs.

The plan (:mod:`fuselab.merge.plan`) names, for every output tensor, the tensor each input contributes (the
same name for whole models; a renumbered layer for ``slices``). For each output tensor the engine reads those
(float32, on the compute device), rebuilds embedding rows in the output's token order when vocabularies differ
(:mod:`fuselab.merge.tokenizer`), forms task vectors in place when the method works on deltas, calls the
method, checks the result, casts it and hands it to a background writer that streams it into a pre-planned
safetensors shard. While one tensor is merged, the next one is read on another thread. Peak memory is
therefore about (inputs + 2) × the largest tensor, whatever the model size, and no shard is ever buffered.

Everything is checked before any tensor is read: the recipe (method, parameter names, types, ranges, their
combinations for every tensor), the inputs (architecture, structure, tensor names, shapes, vocabulary, layer
ranges) and the output path. The output is built in a temporary folder and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fuselab import __version__
from fuselab.merge.compat import PlannedRead, check_mergeable
from fuselab.merge.parameters import Settings, lookup, setting_endpoints
from fuselab.merge.plan import (
    MergeSlice,
    OutputTensor,
    build_slices,
    is_vocabulary_tensor,
    output_config,
    plan_tensors,
)
from fuselab.merge.recipe import MergeRecipe
from fuselab.merge.registry import REQUIRED, MergeMethod, all_param_names, get_merge_method
from fuselab.merge.tokenizer import VocabularyPlan, plan_vocabulary, resolve_chat_template
from fuselab.modeling.checkpoint import Checkpoint, TensorInfo
from fuselab.modeling.writer import BackgroundWriter, ShardedSafetensorsWriter, TensorSpec, parse_size
from fuselab.utils.atomic import atomic_output_dir, check_output_dir, output_lock
from fuselab.utils.config import dump_yaml, load_config, validate_config
from fuselab.utils.errors import ConfigError, FuselabError, IncompatibleModelsError, NonFiniteError
from fuselab.utils.progress import progress

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class MergeOptions:
    """Run-time options (not part of the recipe): where to compute and how to write."""

    device: str = "cpu"
    out_shard_size: int | str = "2GB"
    force: bool = False
    seed: int | None = None  # overrides the recipe's seed
    show_progress: bool = True


@dataclass
class MergeResult:
    out_dir: Path
    method: str
    num_tensors: int
    bytes_written: int
    seconds: float
    files: list[str] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so random masks do not depend on processing order or device."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# -- recipe parameters --------------------------------------------------------------------------------


def _parameter_slots(recipe: MergeRecipe) -> list[tuple[str, Settings, bool]]:
    """(where, settings, per-model slot) for every ``parameters`` block of the recipe."""
    slots: list[tuple[str, Settings, bool]] = [("parameters", recipe.parameters, False)]
    slots += [
        (f"models[{i}] ({m.model}).parameters", m.parameters, True) for i, m in enumerate(recipe.models)
    ]
    for s, sl in enumerate(recipe.slices or []):
        slots.append((f"slices[{s}].parameters", sl.parameters, False))
        slots += [
            (f"slices[{s}].sources[{k}] ({src.model}).parameters", src.parameters, True)
            for k, src in enumerate(sl.sources)
        ]
    return slots


def _required_shared(method: MergeMethod, recipe: MergeRecipe) -> None:
    glob = recipe.parameters or {}
    scopes = [sl.parameters or {} for sl in recipe.slices or []] or [{}]
    for p in method.params:
        missing = p.name not in glob and not all(p.name in scope for scope in scopes)
        if not p.per_model and p.default is REQUIRED and missing:
            raise ConfigError(
                f"{method.name} needs `{p.name}` ({p.help}); set it under the top-level `parameters`"
                + (" or every slice's" if recipe.slices else "")
            )


def _required_per_model(method: MergeMethod, recipe: MergeRecipe, merged_models: list[int]) -> None:
    _required_shared(method, recipe)
    glob = recipe.parameters or {}
    needed = [p.name for p in method.params if p.per_model and p.default is REQUIRED and p.name not in glob]
    checks = [
        (f"models[{i}] ({recipe.models[i].model})", recipe.models[i].parameters, None) for i in merged_models
    ]
    for s, sl in enumerate(recipe.slices or []):
        base = (sl.base_model or recipe.base_model) if method.uses_base(True) else None
        checks += [
            (f"slices[{s}].sources[{k}] ({src.model})", src.parameters, sl.parameters)
            for k, src in enumerate(sl.sources)
            if src.model != base
        ]
    for name in needed:
        for where, own, shared in checks:
            if name not in (own or {}) and name not in (shared or {}):
                raise ConfigError(
                    f"{where}: {method.name} needs `{name}`; set it under the model's `parameters` or the "
                    "top-level `parameters`"
                )


def validate_parameters(method: MergeMethod, recipe: MergeRecipe, merged_models: list[int]) -> None:
    """Check parameter names, placement, types and ranges for the whole recipe before any work.

    ``merged_models`` are the indices under ``models`` that are merged (not the base); slices are checked by
    name.
    """
    known_elsewhere = all_param_names()
    valid = ", ".join(p.name for p in method.params) or "(none)"
    for where, settings, per_model_slot in _parameter_slots(recipe):
        for name, setting in (settings or {}).items():
            p = method.param(name)
            if p is None:
                if name in known_elsewhere:
                    log.warning("%s: `%s` is not a parameter of %s and is ignored", where, name, method.name)
                    continue
                raise ConfigError(
                    f"{where}: unknown parameter `{name}` for {method.name}; its parameters: {valid}"
                )
            if per_model_slot and not p.per_model:
                raise ConfigError(
                    f"{where}: `{name}` applies to the whole merge, not to one model; move it under the "
                    "top-level `parameters`"
                )
            for value in setting_endpoints(setting):
                p.check(value, f"{where}.{name}")
    _required_per_model(method, recipe, merged_models)


def resolve_tensor_params(
    method: MergeMethod,
    shared: tuple[Settings, ...],
    per_model: list[tuple[tuple[Settings, ...], str, str]],
    tensor: str,
    t: float,
) -> dict[str, Any]:
    """The method's keyword arguments for one tensor (per-model values as lists aligned with the inputs).

    ``shared`` is the settings chain of global parameters (a slice's, then the recipe's); ``per_model`` holds,
    for each merged input, its chain, the name of the tensor it contributes (filters of per-model parameters
    match that name, as in mergekit) and where the recipe names it.
    """
    out: dict[str, Any] = {}
    for p in method.params:
        arg = p.name + "_" if p.name == "lambda" else p.name
        if not p.per_model:
            value = lookup(shared, p.name, tensor, t)
            out[arg] = p.check(p.default if value is None else value, f"tensor {tensor}")
            continue
        values = []
        for chain, name, where in per_model:
            value = lookup(chain, p.name, name, t)
            if value is None:
                if p.default is REQUIRED:
                    raise ConfigError(
                        f"{where}: no `{p.name}` applies to tensor {name} (no filter matched); add a default "
                        "entry without a filter"
                    )
                value = p.default
            values.append(p.check(value, f"{where}.{p.name} for tensor {name}"))
        out[arg] = values
    return out


# -- the engine -----------------------------------------------------------------------------------------


def _load_recipe(recipe: MergeRecipe | dict | str | Path) -> tuple[MergeRecipe, str]:
    if isinstance(recipe, MergeRecipe):
        return recipe, "recipe"
    if isinstance(recipe, dict):
        return validate_config(MergeRecipe, recipe, "recipe"), "recipe"
    return load_config(MergeRecipe, recipe), str(recipe)


def _check_finite(t: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError if ``t`` holds NaN or ±inf.

    The sum of a tensor is finite exactly when every entry is (barring overflow of the sum, which then takes
    the slow path): one reduction instead of ``isfinite``'s several full-size temporaries.
    """
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in t.reshape(-1).split(1 << 20))
    if bad:
        raise NonFiniteError(f"{what} holds {bad} NaN/inf value(s) of {t.numel()}")


class _Merger:
    def __init__(self, recipe: MergeRecipe, source: str, options: MergeOptions):
        self.recipe = recipe
        self.source = source
        self.options = options
        self.method = get_merge_method(recipe.merge_method)
        self.device = resolve_device(options.device)
        self.seed = (
            options.seed if options.seed is not None else (recipe.seed if recipe.seed is not None else 0)
        )
        if self.method.needs_base and not self._every_slice_has_base():
            raise ConfigError(
                f"{self.method.name} works from a base model and needs `base_model`; name the base model"
            )
        # Parameters are checked before any model is resolved (which may mean fetching it).
        validate_parameters(self.method, recipe, self._merged_by_name())

        self.opened: dict[Path, Checkpoint] = {}
        self.labels: dict[int, str] = {}
        self.whole_models = not recipe.slices
        self.slices = build_slices(recipe, self.method, self._open)
        self.base = self._open(recipe.base_model) if recipe.base_model else None
        self.reference = self.base or self.slices[0].inputs[0].ckpt
        self.tokenizer_input = self._open(recipe.tokenizer_ref)
        self.outputs = plan_tensors(self.reference, self.slices, self.whole_models)
        self._check_vocabulary_sizes()
        self.vocab = self._plan_vocabulary()
        self.vocab_names = self._vocabulary_names()
        self._check_tokenizer_fits()
        self.sources = check_mergeable(
            self.reference,
            [self._planned_read(out) for out in self.outputs],
            self.labels,
            ignore_keys=frozenset(
                ({"vocab_size"} if self.vocab else set())
                | (set() if self.whole_models else {"num_hidden_layers"})
            ),
            whole_models=self.whole_models,
        )
        self.params = [self._resolve(out) for out in self.outputs]
        name = recipe.output_dtype_name()
        self.out_dtype = DTYPES[name] if name else self.reference.main_dtype()

    # planning

    def _open(self, ref: str) -> Checkpoint:
        from fuselab.modeling.resolve import resolve_model

        path = resolve_model(ref).resolve()
        if path not in self.opened:
            self.opened[path] = Checkpoint(path)
            self.labels[id(self.opened[path])] = f"{ref!r}" if ref == str(path) else f"{ref!r} ({path})"
        return self.opened[path]

    def _every_slice_has_base(self) -> bool:
        if self.recipe.base_model:
            return True
        return bool(self.recipe.slices) and all(sl.base_model for sl in self.recipe.slices)

    def _merged_by_name(self) -> list[int]:
        base = self.recipe.base_model
        uses_base = self.method.uses_base(base is not None)
        return [i for i, m in enumerate(self.recipe.models) if not (uses_base and m.model == base)]

    def _plan_vocabulary(self) -> VocabularyPlan | None:
        source = self.recipe.tokenizer_source_name
        if source is None:
            return None
        inputs = [(inp.ckpt, self.labels[id(inp.ckpt)]) for sl in self.slices for inp in sl.inputs]
        pad = self.recipe.tokenizer.pad_to_multiple_of if self.recipe.tokenizer else None
        return plan_vocabulary(source, inputs, self.reference, self.tokenizer_input, pad)

    def _check_vocabulary_sizes(self) -> None:
        """Every input's ``config.vocab_size`` must match its embedding: the plan finds vocabulary tensors by
        that size, and transformers builds the model from it, so a mismatch fails late and obscurely."""
        from fuselab.modeling.inspect import check_config_vocab_size, embedding_rows

        for ckpt in self.opened.values():
            check_config_vocab_size(ckpt, self.labels[id(ckpt)], {"embedding": embedding_rows(ckpt)})

    def _check_tokenizer_fits(self) -> None:
        """The tokenizer written with the output must not emit ids beyond the merged embedding: the model
        would crash on the first forward that meets such a token (``fuselab info`` flags the same)."""
        from fuselab.modeling.inspect import embedding_rows, tokenizer_id_bound

        if self.vocab is not None and self.vocab.tokenizer is not None:
            return  # the union tokenizer is built with the embedding
        if self.vocab is not None:
            rows = self.vocab.size
        else:
            found = embedding_rows(self.reference)
            if found is None:
                return
            rows = found[1]
        bound = tokenizer_id_bound(self.tokenizer_input.path)
        if bound is None or bound <= rows:
            return
        raise IncompatibleModelsError(
            f"the tokenizer of {self.labels[id(self.tokenizer_input)]} has token ids up to {bound - 1}, but the "
            f"merged embedding has {rows} rows: the model would crash on the first of those {bound - rows} "
            "tokens. Name a `tokenizer_source` whose tokenizer fits its embedding, or resize the inputs' "
            "embeddings to the tokenizer (`fuselab info MODEL` shows both sizes)"
        )

    def _vocabulary_names(self) -> set[str]:
        """Output tensors whose rows follow the vocabulary (outside the layers, so named as in the reference)."""
        if self.vocab is None:
            return set()
        vocab_size = self.reference.text_config().get("vocab_size")
        ref = self.reference.tensors
        return {
            o.name
            for o in self.outputs
            if o.name in ref and is_vocabulary_tensor(o.name, ref[o.name].shape, vocab_size)
        }

    def _layout(self, out: OutputTensor) -> tuple[Checkpoint, str]:
        """Whose tensor the output's layout (dtype, shape) follows: the reference's for whole models, else the
        slice's first input's."""
        if self.whole_models:
            return self.reference, out.name
        return self.slices[out.slice].inputs[0].ckpt, out.sources[0]

    def layout_of(self, out: OutputTensor) -> tuple[Checkpoint, TensorInfo]:
        ckpt, name = self._layout(out)
        return ckpt, ckpt.tensors[self.sources[id(ckpt)][name]]

    def _planned_read(self, out: OutputTensor) -> PlannedRead:
        sl = self.slices[out.slice]
        reads = tuple((inp.ckpt, name) for inp, name in zip(sl.inputs, out.sources))
        return PlannedRead(out.name, reads, self._layout(out), vocabulary=out.name in self.vocab_names)

    def _resolve(self, out: OutputTensor) -> dict[str, Any]:
        sl = self.slices[out.slice]
        glob = self.recipe.parameters
        per_model = [
            ((sl.inputs[i].parameters, sl.parameters, glob), out.sources[i], sl.inputs[i].where)
            for i in sl.merged
        ]
        kwargs = resolve_tensor_params(self.method, (sl.parameters, glob), per_model, out.name, out.t)
        if self.method.check is not None:
            problem = self.method.check(kwargs, [sl.inputs[i].label for i in sl.merged])
            if problem:
                raise ConfigError(f"{self.method.name}, tensor {out.name}: {problem}")
        return kwargs

    # per-tensor pieces

    def read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        t = ckpt.read(self.sources[id(ckpt)][name], device=self.device, dtype=torch.float32)
        _check_finite(t, f"tensor `{name}` of {self.labels[id(ckpt)]}")
        return t

    def on_deltas(self, sl: MergeSlice) -> bool:
        return self.method.on_deltas(sl.base is not None)

    def load_inputs(self, index: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, tensors) of output tensor ``index``; for delta methods the tensors are task vectors, formed
        in place; embedding rows are aligned to the output vocabulary first."""
        out = self.outputs[index]
        if not self.layout_of(out)[1].dtype.is_floating_point:
            return None, []
        sl = self.slices[out.slice]
        order = sl.merged + ([sl.base] if sl.base is not None else [])
        tensors = [self.read(sl.inputs[i].ckpt, out.sources[i]) for i in order]
        if out.name in self.vocab_names:
            assert self.vocab is not None
            base_at = len(order) - 1 if sl.base is not None else None
            tensors = self.vocab.align(tensors, [sl.inputs[i].ckpt.path for i in order], base_at)
        base = tensors.pop() if sl.base is not None else None
        if base is not None and self.on_deltas(sl):
            for t in tensors:
                t.sub_(base)
        return base, tensors

    def merge_one(
        self, index: int, base: torch.Tensor | None, tensors: list[torch.Tensor], group_stat
    ) -> torch.Tensor:
        out_spec = self.outputs[index]
        name = out_spec.name
        if not tensors:  # a non-floating tensor (e.g. an integer buffer): taken as it is
            ckpt, info = self.layout_of(out_spec)
            return ckpt.read(info.name)
        kwargs = dict(self.params[index])
        if self.method.random:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(tensor_seed(self.seed, name))
            kwargs["generator"] = gen
        if group_stat is not None:
            kwargs["group_stat"] = group_stat
        if self.method.inputs == "base_and_weights":
            kwargs["base"] = base
        out = self.method.func(tensors, **kwargs)
        if base is not None and self.on_deltas(self.slices[out_spec.slice]):
            out = out.add_(base)
        if not any(out is t for t in tensors):  # an input passed through unchanged was checked when read
            _check_finite(out, f"merged tensor `{name}` ({self.method.name})")
        out = out.to(self.out_dtype)
        if out.dtype != torch.float32:
            _check_finite(out, f"merged tensor `{name}` after conversion to {self.out_dtype} (out of range)")
        return out.cpu()

    def group_statistics(self) -> dict[str, torch.Tensor]:
        gs = self.method.group_statistic
        if gs is None:
            return {}
        indices = [
            i
            for i, out in enumerate(self.outputs)
            if gs.needed(self.params[i]) and self.layout_of(out)[1].dtype.is_floating_point
        ]
        if not indices:
            return {}
        stats: dict[str, torch.Tensor] = {}
        for i in progress(
            indices, desc="statistics pass", unit="tensor", disable=not self.options.show_progress
        ):
            _, deltas = self.load_inputs(i)
            s = gs.compute(deltas).cpu()
            key = gs.group_of(self.outputs[i].name)
            stats[key] = stats[key] + s if key in stats else s
        return stats

    def out_spec(self, out: OutputTensor) -> TensorSpec:
        info = self.layout_of(out)[1]
        shape = info.shape
        if out.name in self.vocab_names:
            assert self.vocab is not None
            shape = (self.vocab.size, *shape[1:])
        return TensorSpec(out.name, self.out_dtype if info.dtype.is_floating_point else info.dtype, shape)

    def run(self, out_dir: Path) -> MergeResult:
        start = time.perf_counter()
        specs = [self.out_spec(o) for o in self.outputs]
        try:
            with atomic_output_dir(out_dir, force=self.options.force, inputs=self.opened) as tmp:
                files = self.stream(tmp, specs)
                self.write_metadata(tmp)
                total = sum(s.nbytes for s in specs)
                seconds = time.perf_counter() - start
                result = MergeResult(Path(out_dir), self.method.name, len(specs), total, seconds, files)
                self.write_provenance(tmp, result)
        finally:
            for ckpt in self.opened.values():
                ckpt.close()
        return result

    def stream(self, out: Path, specs: list[TensorSpec]) -> list[str]:
        """Merge every tensor into ``out``: read ahead on one thread, write behind on another."""
        stats = self.group_statistics()
        gs = self.method.group_statistic
        writer = BackgroundWriter(
            ShardedSafetensorsWriter(out, specs, parse_size(self.options.out_shard_size))
        )
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuselab-reader")
        bar = progress(
            total=sum(s.nbytes for s in specs),
            desc=f"merging ({self.method.name})",
            unit="B",
            unit_scale=True,
            disable=not self.options.show_progress,
        )
        try:
            pending: Future = pool.submit(self.load_inputs, 0)
            for i, spec in enumerate(specs):
                base, tensors = pending.result()
                if i + 1 < len(specs):
                    pending = pool.submit(self.load_inputs, i + 1)
                group_stat = stats.get(gs.group_of(spec.name)) if (gs and stats) else None
                out_tensor = self.merge_one(i, base, tensors, group_stat)
                del base, tensors
                writer.write(spec.name, out_tensor)
                bar.update(spec.nbytes)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)

    # outputs beside the weights

    def write_metadata(self, out: Path) -> None:
        config = output_config(
            self.reference,
            self.outputs,
            self.slices,
            restacked=not self.whole_models,
            vocab_size=self.vocab.size if self.vocab else None,
        )
        dtype_name = str(self.out_dtype).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.write_tokenizer(out)
        gen = self.tokenizer_input.path / "generation_config.json"
        if not gen.is_file():
            gen = self.reference.path / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, out / "generation_config.json")

    def write_tokenizer(self, out: Path) -> None:
        """The tokenizer source's files (or the union tokenizer), then the recipe's chat template."""
        tok_dir = self.tokenizer_input.path
        if self.vocab is not None and self.vocab.tokenizer is not None:
            self.vocab.tokenizer.save_pretrained(out)
        else:
            copied = [f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
            if not any(
                f in copied
                for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
            ):
                raise FuselabError(
                    f"{self.labels[id(self.tokenizer_input)]} has no tokenizer files; name a `tokenizer_source` "
                    "that has one (the merged model would not be usable without a tokenizer)"
                )
            for f in copied:
                shutil.copy2(tok_dir / f, out / f)
        model_dirs = [c.path for c in self.opened.values()]
        template = resolve_chat_template(self.recipe.chat_template, tok_dir, model_dirs)
        if template is None:
            return
        (out / "chat_template.jinja").write_text(template)
        (out / "chat_template.json").unlink(missing_ok=True)
        tc = out / "tokenizer_config.json"
        if tc.is_file():
            data = json.loads(tc.read_text())
            if data.pop("chat_template", None) is not None:
                tc.write_text(json.dumps(data, indent=2) + "\n")

    def resolved_recipe(self) -> dict[str, Any]:
        data = self.recipe.model_dump(mode="json", exclude_none=True)
        if self.base:
            data["base_model"] = str(self.base.path)
        path_of = {inp.where: str(inp.ckpt.path) for sl in self.slices for inp in sl.inputs}
        for i, m in enumerate(data.get("models") or []):
            m["model"] = path_of[f"models[{i}]"]
        for s, sl in enumerate(data.get("slices") or []):
            for k, src in enumerate(sl["sources"]):
                src["model"] = path_of[f"slices[{s}].sources[{k}]"]
            if sl.get("base_model"):
                sl["base_model"] = str(self._open(sl["base_model"]).path)
        if not data.get("models"):
            data.pop("models", None)
        params = dict(data.get("parameters") or {})
        for p in self.method.params:
            if not p.per_model and p.name not in params:
                params[p.name] = p.default
        data["parameters"] = params
        data["out_dtype"] = str(self.out_dtype).removeprefix("torch.")
        data["seed"] = self.seed
        return data

    def card_inputs(self, resolved: dict[str, Any]) -> list[tuple[str, Path, dict[str, Any] | None]]:
        if self.whole_models:
            return [
                (inp.ref, inp.ckpt.path, m.get("parameters"))
                for inp, m in zip(self.slices[0].inputs, resolved["models"])
            ]
        rows = []
        for sl, spec in zip(self.slices, resolved["slices"]):
            for inp, src in zip(sl.inputs, spec["sources"]):
                rows.append(
                    (
                        inp.ref,
                        inp.ckpt.path,
                        {"layer_range": src["layer_range"], **(src.get("parameters") or {})},
                    )
                )
        return rows

    def write_provenance(self, out: Path, result: MergeResult) -> None:
        from fuselab.merge.card import render_merge_card

        resolved = self.resolved_recipe()
        header = (
            f"# Resolved by fuselab {__version__} on {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            f"# from {self.source}; rerun with: fuselab merge fuselab_merge.yaml OUT_DIR\n"
        )
        (out / "fuselab_merge.yaml").write_text(header + dump_yaml(resolved))
        (out / "README.md").write_text(
            render_merge_card(
                method=self.method,
                resolved=resolved,
                inputs=self.card_inputs(resolved),
                base=(self.recipe.base_model, self.base.path)
                if self.base and self.recipe.base_model
                else None,
                reference=self.reference,
                result=result,
            )
        )


def run_merge(
    recipe: MergeRecipe | dict | str | Path,
    out_dir: str | Path,
    options: MergeOptions | None = None,
    **option_overrides: Any,
) -> MergeResult:
    """Merge the models of ``recipe`` (a MergeRecipe, a dict, or a YAML path) into ``out_dir``.

    Keyword overrides are :class:`MergeOptions` fields, e.g. ``run_merge(recipe, out, device="cuda", force=True)``.
    """
    options = options or MergeOptions()
    if option_overrides:
        options = MergeOptions(**{**options.__dict__, **option_overrides})
    recipe_obj, source = _load_recipe(recipe)
    out_dir = Path(out_dir)
    with output_lock(out_dir.absolute()):  # a second merge to the same folder fails at once
        check_output_dir(out_dir.absolute(), options.force)
        try:
            parse_size(options.out_shard_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        merger = _Merger(recipe_obj, source, options)
        # now that the inputs are resolved: never an input (or a folder holding one), whatever --force says
        check_output_dir(out_dir.absolute(), options.force, inputs=merger.opened)
        return merger.run(out_dir)
