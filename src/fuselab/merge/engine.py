"""The streaming merge engine: one tensor at a time from any number of inputs.

For every output tensor the engine reads that tensor from each input (float32, on the compute device),
forms task vectors in place when the method works on deltas, calls the method, checks the result, casts it
and hands it to a background writer that streams it into a pre-planned safetensors shard. While one tensor is
merged, the next one is read on another thread. Peak memory is therefore about (inputs + 2) × the largest
tensor, whatever the model size, and no shard is ever buffered.

Everything is checked before any tensor is read: the recipe (method, parameter names, types, ranges), the
inputs (architecture, structure, tensor names, shapes, vocabulary) and the output path. The output is built in
a temporary folder and renamed into place at the end.
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
from fuselab.merge.compat import check_mergeable
from fuselab.merge.parameters import evaluate_setting, layer_fraction, setting_endpoints
from fuselab.merge.recipe import MergeRecipe
from fuselab.merge.registry import REQUIRED, MergeMethod, all_param_names, get_merge_method
from fuselab.modeling.checkpoint import Checkpoint, TensorInfo
from fuselab.modeling.writer import BackgroundWriter, ShardedSafetensorsWriter, TensorSpec, parse_size
from fuselab.utils.atomic import atomic_output_dir, check_output_dir
from fuselab.utils.config import dump_yaml, load_config, validate_config
from fuselab.utils.errors import ConfigError, FuselabError, NonFiniteError
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


@dataclass
class _Input:
    ref: str
    ckpt: Checkpoint

    @property
    def label(self) -> str:
        return f"{self.ref!r}" if self.ref == str(self.ckpt.path) else f"{self.ref!r} ({self.ckpt.path})"


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


def validate_parameters(method: MergeMethod, recipe: MergeRecipe, merged_models: list[int]) -> None:
    """Check parameter names, placement, types and ranges for the whole recipe before any work."""
    known_elsewhere = all_param_names()
    valid = ", ".join(p.name for p in method.params) or "(none)"

    def check(name: str, setting: Any, where: str, per_model_slot: bool) -> None:
        p = method.param(name)
        if p is None:
            if name in known_elsewhere:
                log.warning("%s: `%s` is not a parameter of %s and is ignored", where, name, method.name)
                return
            raise ConfigError(
                f"{where}: unknown parameter `{name}` for {method.name}; its parameters: {valid}"
            )
        if per_model_slot and not p.per_model:
            raise ConfigError(
                f"{where}: `{name}` applies to the whole merge, not to one model; move it under the top-level "
                "`parameters`"
            )
        for value in setting_endpoints(setting):
            p.check(value, f"{where}.{name}")

    for name, setting in (recipe.parameters or {}).items():
        check(name, setting, "parameters", per_model_slot=False)
    for i, m in enumerate(recipe.models):
        for name, setting in (m.parameters or {}).items():
            check(name, setting, f"models[{i}] ({m.model}).parameters", per_model_slot=True)
    for p in method.params:
        if p.per_model and p.default is REQUIRED:
            for i in merged_models:
                m = recipe.models[i]
                if p.name not in (m.parameters or {}) and p.name not in (recipe.parameters or {}):
                    raise ConfigError(
                        f"models[{i}] ({m.model}): {method.name} needs `{p.name}`; set it under the model's "
                        "`parameters` or the top-level `parameters`"
                    )


def resolve_tensor_params(
    method: MergeMethod, recipe: MergeRecipe, merged_models: list[int], tensor: str, t: float
) -> dict[str, Any]:
    """The method's keyword arguments for one tensor (per-model values as lists aligned with the inputs)."""
    glob = recipe.parameters or {}
    out: dict[str, Any] = {}
    for p in method.params:
        arg = p.name + "_" if p.name == "lambda" else p.name
        if not p.per_model:
            value = evaluate_setting(glob[p.name], tensor, t) if p.name in glob else None
            value = p.default if value is None else value
            out[arg] = p.check(value, f"tensor {tensor}")
            continue
        values = []
        for i in merged_models:
            own = recipe.models[i].parameters or {}
            value = evaluate_setting(own[p.name], tensor, t) if p.name in own else None
            if value is None and p.name in glob:
                value = evaluate_setting(glob[p.name], tensor, t)
            if value is None:
                if p.default is REQUIRED:
                    raise ConfigError(
                        f"models[{i}] ({recipe.models[i].model}): no `{p.name}` applies to tensor {tensor} "
                        "(no filter matched); add a default entry without a filter"
                    )
                value = p.default
            values.append(p.check(value, f"models[{i}].{p.name} for tensor {tensor}"))
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
        from fuselab.modeling.resolve import resolve_model

        self.recipe = recipe
        self.source = source
        self.options = options
        self.method = get_merge_method(recipe.merge_method)
        self.device = resolve_device(options.device)
        self.seed = (
            options.seed if options.seed is not None else (recipe.seed if recipe.seed is not None else 0)
        )
        if self.method.needs_base and recipe.base_model is None:
            raise ConfigError(
                f"{self.method.name} works on task vectors and needs `base_model`; name the base model"
            )
        # Parameters are checked before any model is resolved (which may mean fetching it); models named
        # differently from the base but resolving to it are excluded again below.
        validate_parameters(self.method, recipe, self._merged_by_name())

        # Resolve and open every distinct input once.
        self.opened: dict[Path, Checkpoint] = {}

        def open_ref(ref: str) -> _Input:
            path = resolve_model(ref).resolve()
            if path not in self.opened:
                self.opened[path] = Checkpoint(path)
            return _Input(ref, self.opened[path])

        self.models = [open_ref(m.model) for m in recipe.models]
        self.base = open_ref(recipe.base_model) if recipe.base_model else None
        self.tokenizer_input = open_ref(recipe.tokenizer_ref)
        if self.method.needs_base:
            assert self.base is not None
            self.merged = [i for i, m in enumerate(self.models) if m.ckpt is not self.base.ckpt]
            skipped = [self.models[i].ref for i in range(len(self.models)) if i not in self.merged]
            if skipped:
                log.info("%s is the base model; it is not merged as a task vector", skipped[0])
            if not self.merged:
                raise ConfigError(
                    f"{self.method.name} needs at least one model besides the base under `models`"
                )
        else:
            self.merged = list(range(len(self.models)))
        validate_parameters(self.method, recipe, self.merged)

        self.reference = (self.base or self.models[0]).ckpt
        self.out_names = list(self.reference.tensors)
        labels = {id(inp.ckpt): inp.label for inp in [*self.models, *([self.base] if self.base else [])]}
        self.sources = check_mergeable(
            self.reference, [self.models[i].ckpt for i in self.merged], labels, self.out_names
        )
        self.labels = labels
        self.num_layers = int(self.reference.text_config().get("num_hidden_layers") or 1)
        name = recipe.output_dtype_name()
        self.out_dtype = DTYPES[name] if name else self.reference.main_dtype()

    def _merged_by_name(self) -> list[int]:
        base = self.recipe.base_model
        models = self.recipe.models
        return [i for i, m in enumerate(models) if not (self.method.needs_base and m.model == base)]

    # per-tensor pieces

    def params_for(self, name: str) -> dict[str, Any]:
        return resolve_tensor_params(
            self.method, self.recipe, self.merged, name, layer_fraction(name, self.num_layers)
        )

    def read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        t = ckpt.read(self.sources[id(ckpt)][name], device=self.device, dtype=torch.float32)
        _check_finite(t, f"tensor `{name}` of {self.labels[id(ckpt)]}")
        return t

    def load_inputs(self, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """(base, tensors); for delta methods the tensors are task vectors, formed in place."""
        if not self.ref_info(name).dtype.is_floating_point:
            return None, []
        tensors = [self.read(self.models[i].ckpt, name) for i in self.merged]
        if not self.method.needs_base:
            return None, tensors
        assert self.base is not None
        base = self.read(self.base.ckpt, name)
        for t in tensors:
            t.sub_(base)
        return base, tensors

    def merge_one(
        self, name: str, base: torch.Tensor | None, tensors: list[torch.Tensor], group_stat
    ) -> torch.Tensor:
        if not tensors:  # a non-floating tensor (e.g. an integer buffer): taken from the reference
            return self.reference.read(self.ref_info(name).name)
        kwargs = self.params_for(name)
        if self.method.random:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(tensor_seed(self.seed, name))
            kwargs["generator"] = gen
        if group_stat is not None:
            kwargs["group_stat"] = group_stat
        out = self.method.func(tensors, **kwargs)
        if base is not None:
            out = out.add_(base)
        _check_finite(out, f"merged tensor `{name}` ({self.method.name})")
        out = out.to(self.out_dtype)
        if out.dtype != torch.float32:
            _check_finite(out, f"merged tensor `{name}` after conversion to {self.out_dtype} (out of range)")
        return out.cpu()

    def group_statistics(self) -> dict[str, torch.Tensor]:
        gs = self.method.group_statistic
        if gs is None:
            return {}
        names = [
            n
            for n in self.out_names
            if gs.needed(self.params_for(n)) and self.ref_info(n).dtype.is_floating_point
        ]
        if not names:
            return {}
        stats: dict[str, torch.Tensor] = {}
        for name in progress(
            names, desc="statistics pass", unit="tensor", disable=not self.options.show_progress
        ):
            _, deltas = self.load_inputs(name)
            s = gs.compute(deltas).cpu()
            key = gs.group_of(name)
            stats[key] = stats[key] + s if key in stats else s
        return stats

    def ref_info(self, name: str) -> TensorInfo:
        """The reference checkpoint's stored tensor behind output tensor ``name`` (layout, dtype, shape)."""
        return self.reference.tensors[self.sources[id(self.reference)][name]]

    def out_spec(self, name: str) -> TensorSpec:
        info = self.ref_info(name)
        return TensorSpec(name, self.out_dtype if info.dtype.is_floating_point else info.dtype, info.shape)

    def run(self, out_dir: Path) -> MergeResult:
        start = time.perf_counter()
        specs = [self.out_spec(n) for n in self.out_names]
        try:
            with atomic_output_dir(out_dir, force=self.options.force) as tmp:
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
            pending: Future = pool.submit(self.load_inputs, self.out_names[0])
            for i, (name, spec) in enumerate(zip(self.out_names, specs)):
                base, tensors = pending.result()
                if i + 1 < len(self.out_names):
                    pending = pool.submit(self.load_inputs, self.out_names[i + 1])
                group_stat = stats.get(gs.group_of(name)) if (gs and stats) else None
                out_tensor = self.merge_one(name, base, tensors, group_stat)
                del base, tensors
                writer.write(name, out_tensor)
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
        config = dict(self.reference.config)
        dtype_name = str(self.out_dtype).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tok_dir = self.tokenizer_input.ckpt.path
        copied = [f for f in TOKENIZER_FILES if (tok_dir / f).is_file()]
        if not any(
            f in copied
            for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
        ):
            raise FuselabError(
                f"{self.tokenizer_input.label} has no tokenizer files; name a `tokenizer_source` that has one "
                "(the merged model would not be usable without a tokenizer)"
            )
        for f in copied:
            shutil.copy2(tok_dir / f, out / f)
        gen = tok_dir / "generation_config.json"
        if not gen.is_file():
            gen = self.reference.path / "generation_config.json"
        if gen.is_file():
            shutil.copy2(gen, out / "generation_config.json")
        if self.recipe.chat_template not in (None, "auto"):
            (out / "chat_template.jinja").write_text(self.recipe.chat_template)
            (out / "chat_template.json").unlink(missing_ok=True)
            tc = out / "tokenizer_config.json"
            if tc.is_file():
                data = json.loads(tc.read_text())
                if data.pop("chat_template", None) is not None:
                    tc.write_text(json.dumps(data, indent=2) + "\n")

    def resolved_recipe(self) -> dict[str, Any]:
        data = self.recipe.model_dump(mode="json", exclude_none=True)
        data["base_model"] = str(self.base.ckpt.path) if self.base else None
        if data["base_model"] is None:
            del data["base_model"]
        for m, inp in zip(data["models"], self.models):
            m["model"] = str(inp.ckpt.path)
        params = dict(data.get("parameters") or {})
        for p in self.method.params:
            if not p.per_model and p.name not in params:
                params[p.name] = p.default
        data["parameters"] = params
        data["out_dtype"] = str(self.out_dtype).removeprefix("torch.")
        data["seed"] = self.seed
        return data

    def write_provenance(self, out: Path, result: MergeResult) -> None:
        from fuselab.merge.card import render_merge_card

        resolved = self.resolved_recipe()
        header = (
            f"# Resolved by fuselab {__version__} on {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            f"# from {self.source}; rerun with: fuselab merge fuselab_merge.yaml OUT_DIR\n"
        )
        (out / "fuselab_merge.yaml").write_text(header + dump_yaml(resolved))
        inputs = [
            (inp.ref, inp.ckpt.path, m.get("parameters")) for inp, m in zip(self.models, resolved["models"])
        ]
        (out / "README.md").write_text(
            render_merge_card(
                method=self.method,
                resolved=resolved,
                inputs=inputs,
                base=(self.base.ref, self.base.ckpt.path) if self.base else None,
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
    check_output_dir(out_dir.absolute(), options.force)
    try:
        parse_size(options.out_shard_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return _Merger(recipe_obj, source, options).run(out_dir)
