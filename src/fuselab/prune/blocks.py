"""Decoder layers as two residual blocks (attention, MLP), found by inspecting the model.

BlockPruner (Zhong et al., 2024, arXiv:2406.10594, §3.1) treats each pre-norm decoder layer as two "minimal
residual blocks", ``X' = X + MHA(LN(X))`` and ``X'' = X' + MLP(LN(X'))``; removing one turns its equation into
the identity. This module finds those blocks in any transformers decoder with the usual layout, without a
table of class names:

- the decoder layers are the ``nn.ModuleList`` whose length is the config's layer count;
- one forward pass with hooks tells, per layer, which child is the attention (it receives the attention mask /
  position embeddings), which is the MLP (the other child holding weight matrices) and which are norms
  (children holding only vectors), and in which order the layer calls them;
- a norm *belongs* to a block when, with that block removed, perturbing the norm's weights leaves the layer's
  output bitwise unchanged (Llama's ``input_layernorm`` goes with attention; Gemma-3's ``post_attention_layernorm``
  too, because RMSNorm(0) = 0);
- the **exactness probe** then proves, per layer, that (a) with both blocks replaced by zeros the layer is the
  identity, bitwise, and (b) with one block zeroed the layer equals ``x + post(branch(pre(x)))`` of the other
  block computed by hand. Post-LN layers, or LayerNorms with a bias after the residual, fail (a) and are refused.

A block is removed by substituting its module with :class:`ZeroBranch`, which returns zeros in the original
output structure; the stock layer code then adds ``x + 0`` = ``x`` exactly. The layer code itself is never
rewritten, so this keeps working when transformers changes a layer's forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fuselab.prune.kv_cache import cache_parameter
from fuselab.utils.errors import IncompatibleModelsError

KINDS = ("attn", "mlp")
_ATTN_KWARGS = ("attention_mask", "position_embeddings", "position_ids", "cache_position")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "mixer")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


@dataclass(frozen=True, order=True)
class Block:
    """One removable block: ``Block("attn", 12)`` is the attention of decoder layer 12."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"block kind must be one of {KINDS}, got {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def canonical_key(self) -> tuple[int, int]:
        """The reference code's candidate order: every attention block by layer, then every MLP block."""
        return (KINDS.index(self.kind), self.layer)

    @classmethod
    def parse(cls, text: str) -> Block:
        kind, _, layer = text.partition(".")
        if kind not in KINDS or not layer.isdigit():
            raise ValueError(f"cannot read block {text!r}; write e.g. attn.12 or mlp.3")
        return cls(kind, int(layer))


@dataclass(frozen=True)
class OutputSpec:
    """How a module returns its result: a bare tensor (``tuple_len`` None) or a tuple whose first item it is."""

    tuple_len: int | None = None

    def wrap(self, tensor: torch.Tensor) -> Any:
        if self.tuple_len is None:
            return tensor
        return (tensor,) + (None,) * (self.tuple_len - 1)

    @staticmethod
    def of(output: Any) -> OutputSpec:
        if isinstance(output, torch.Tensor):
            return OutputSpec(None)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return OutputSpec(len(output))
        raise IncompatibleModelsError(
            f"a block returns {type(output).__name__}; only a tensor or a tuple starting with one is supported"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"tuple_len": self.tuple_len}


class ZeroBranch(nn.Module):
    """Stands in for a removed attention or MLP module: returns zeros shaped like its input.

    For a removed attention it also appends a tiny placeholder (one head of width one per token) to its KV-cache
    slot when a cache is passed. transformers reads the sequence length (``get_seq_length``) and mask sizes from
    the first attention layer's slot, so without this, removing the attention of layer 0 would shift the
    positions of every generated token. The placeholder is never read by any attention.

    The cache reaches an attention module as a keyword argument whose name changed across transformers releases
    (``past_key_values`` up to 5.23, ``cache`` from 5.24). :meth:`replacing` reads the name from the replaced
    module's own ``forward`` signature rather than assuming one, and ``cache_updates`` counts the placeholders
    written, so :func:`fuselab.prune.kv_cache.check_cache_placeholders` can prove at load time that the cache
    really arrives (and refuse the model loudly on a release where it does not).
    """

    def __init__(
        self, kind: str, output: OutputSpec, layer_idx: int | None = None, cache_arg: str | None = None
    ):
        super().__init__()
        self.kind = kind
        self.output = output
        self.layer_idx = layer_idx
        self.cache_arg = cache_arg
        self.cache_updates = 0

    @classmethod
    def replacing(cls, original: nn.Module, kind: str, output: OutputSpec) -> ZeroBranch:
        """The stand-in for ``original``; a removed attention keeps its layer index and cache argument name."""
        if kind != "attn":
            return cls(kind, output)
        return cls(kind, output, getattr(original, "layer_idx", None), cache_parameter(original))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.kind == "attn" and self.layer_idx is not None and self.cache_arg is not None:
            cache = kwargs.get(self.cache_arg)
            if cache is not None and hasattr(cache, "update"):
                stub = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
                cache.update(stub, stub, self.layer_idx)
                self.cache_updates += 1
        return self.output.wrap(torch.zeros_like(hidden))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer_idx={self.layer_idx}, cache_arg={self.cache_arg}"


@dataclass
class LayerLayout:
    """What one decoder layer is made of (names are attributes of the layer module)."""

    index: int
    attn: str
    mlp: str
    attn_norms: tuple[str, ...]  # norms that go with the attention block
    mlp_norms: tuple[str, ...]  # norms that go with the MLP block
    shared: tuple[str, ...]  # other children with parameters (only removed with the whole layer)
    attn_pre: tuple[str, ...] = ()  # norms applied to the block's input, in call order (for the probe)
    attn_post: tuple[str, ...] = ()
    mlp_pre: tuple[str, ...] = ()
    mlp_post: tuple[str, ...] = ()
    attn_output: OutputSpec = field(default_factory=OutputSpec)
    mlp_output: OutputSpec = field(default_factory=OutputSpec)
    params: dict[str, int] = field(default_factory=dict)  # "attn" / "mlp" / "shared" -> parameter count

    def module_names(self, kind: str) -> tuple[str, ...]:
        """The block's module followed by its own norms: everything removed with it."""
        return (self.attn, *self.attn_norms) if kind == "attn" else (self.mlp, *self.mlp_norms)


@dataclass
class BlockLayout:
    """The blocks of a model and their parameter counts (shared or tied parameters counted once)."""

    layers_path: str
    layers: list[LayerLayout]
    total_params: int
    layer_output: OutputSpec

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def all_blocks(self) -> list[Block]:
        return sorted(
            (Block(k, i) for i in range(self.num_layers) for k in KINDS), key=lambda b: b.canonical_key
        )

    def block_params(self, block: Block) -> int:
        return self.layers[block.layer].params[block.kind]

    def removed_params(self, removed: Iterable[Block]) -> int:
        """Parameters gone with ``removed``; a layer that loses both blocks also loses its shared parameters."""
        removed = set(removed)
        n = sum(self.block_params(b) for b in removed)
        for i, layer in enumerate(self.layers):
            if Block("attn", i) in removed and Block("mlp", i) in removed:
                n += layer.params["shared"]
        return n

    def ratio(self, removed: Iterable[Block]) -> float:
        """Fraction of all parameters removed (the paper's ratio: embeddings and head in the denominator)."""
        return self.removed_params(removed) / self.total_params

    def to_dict(self) -> dict[str, Any]:
        first = self.layers[0]
        return {
            "layers_path": self.layers_path,
            "num_layers": self.num_layers,
            "attention_module": first.attn,
            "mlp_module": first.mlp,
            "attention_norms": list(first.attn_norms),
            "mlp_norms": list(first.mlp_norms),
            "total_params": self.total_params,
            "params_per_block": {"attn": first.params["attn"], "mlp": first.params["mlp"]},
        }


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder layers: its length is the config's layer count."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = next(
        (getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)),
        None,
    )
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) == n
        and n
        and all(len(list(m.children())) for m in mod)
    ]
    if not found:
        raise IncompatibleModelsError(
            f"cannot find the decoder layers of {type(model).__name__}: no module list of {n} layers"
        )
    found.sort(key=lambda nm: nm[0].count("."))
    return found[0][0], found[0][1]  # type: ignore[return-value]


def _param_count(modules: Iterable[nn.Module], seen: set[int]) -> int:
    n = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@dataclass
class _Trace:
    order: list[str] = field(default_factory=list)
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    args: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)


def _trace_forward(model: nn.Module, layers: nn.ModuleList) -> tuple[list[_Trace], list[tuple[tuple, dict]]]:
    """One small forward pass recording, per layer, the calls of its direct children and the layer's inputs."""
    traces = [_Trace() for _ in layers]
    layer_calls: list[tuple[tuple, dict]] = [((), {}) for _ in layers]
    handles = []
    for i, layer in enumerate(layers):

        def layer_hook(mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            layer_calls[i] = (args, dict(kwargs))

        handles.append(layer.register_forward_pre_hook(layer_hook, with_kwargs=True))
        for name, child in layer.named_children():

            def pre(mod: nn.Module, args: tuple, kwargs: dict, i: int = i, name: str = name) -> None:
                if name not in traces[i].kwargs:
                    traces[i].order.append(name)
                    traces[i].kwargs[name] = dict(kwargs)
                    traces[i].args[name] = args

            def post(mod: nn.Module, args: tuple, out: Any, i: int = i, name: str = name) -> None:
                traces[i].outputs.setdefault(name, out)

            handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(child.register_forward_hook(post))
    vocab = model.config.get_text_config().vocab_size
    ids = (torch.arange(1, 9) * 7919 % max(vocab - 1, 1) + 1).unsqueeze(0)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return traces, layer_calls


def _classify(layer: nn.Module, trace: _Trace, index: int) -> tuple[str, str, list[str]]:
    children = dict(layer.named_children())
    with_params = [n for n in trace.order if any(True for _ in children[n].parameters())]
    attn = [n for n in with_params if any(k in trace.kwargs[n] for k in _ATTN_KWARGS)]
    if len(attn) != 1:
        attn = [n for n in with_params if n in _ATTN_NAMES]
    matrices = [
        n for n in with_params if n not in attn and any(p.dim() >= 2 for p in children[n].parameters())
    ]
    if len(matrices) != 1:
        matrices = [n for n in matrices if n in _MLP_NAMES]
    if len(attn) != 1 or len(matrices) != 1:
        raise IncompatibleModelsError(
            f"decoder layer {index} ({type(layer).__name__}) does not have the usual layout of one attention and "
            f"one MLP child (children called: {', '.join(trace.order)}); block pruning needs it"
        )
    norms = [n for n in with_params if n not in (attn[0], matrices[0])]
    return attn[0], matrices[0], norms


def _run_layer(layer: nn.Module, call: tuple[tuple, dict], x: torch.Tensor) -> torch.Tensor:
    args, kwargs = _with_hidden(call[0], call[1], x)
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _zeroed(layer: nn.Module, names_specs: list[tuple[str, str, OutputSpec]]) -> Iterator[None]:
    saved = {}
    for name, kind, spec in names_specs:
        saved[name] = getattr(layer, name)
        setattr(layer, name, ZeroBranch(kind, spec))
    try:
        yield
    finally:
        for name, mod in saved.items():
            setattr(layer, name, mod)


def _dead_norms(layer: nn.Module, call: tuple, x: torch.Tensor, norms: list[str], zero: list) -> set[str]:
    """Norms whose weights do not affect the layer's output once the blocks in ``zero`` are zeroed."""
    dead = set()
    with _zeroed(layer, zero):
        ref = _run_layer(layer, call, x)
        for name in norms:
            params = list(getattr(layer, name).parameters())
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for j, p in enumerate(params):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(j)).to(p) + 0.5)
                out = _run_layer(layer, call, x)
                for p, s in zip(params, saved):
                    p.copy_(s)
            if torch.equal(out, ref):
                dead.add(name)
    return dead


def _apply_norms(layer: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    for n in names:
        x = getattr(layer, n)(x)
    return x


def _probe_layer(layer: nn.Module, lay: LayerLayout, call: tuple, trace: _Trace, x: torch.Tensor) -> None:
    """The exactness probe of one layer (module docstring, (a) and (b)); raises when a check fails."""
    both = [(lay.attn, "attn", lay.attn_output), (lay.mlp, "mlp", lay.mlp_output)]
    with _zeroed(layer, both):
        y = _run_layer(layer, call, x)
    if not torch.equal(y, x):
        raise IncompatibleModelsError(
            f"decoder layer {lay.index} ({type(layer).__name__}) is not a pre-norm residual layer: with its "
            "attention and MLP outputs set to zero it does not return its input (post-LN layers or norms with a "
            "bias after the residual cannot lose a block exactly), so block pruning refuses this model"
        )
    for kind, keep, pre, post, zero in (
        ("MLP", lay.mlp, lay.mlp_pre, lay.mlp_post, both[:1]),
        ("attention", lay.attn, lay.attn_pre, lay.attn_post, both[1:]),
    ):
        with _zeroed(layer, zero):
            y = _run_layer(layer, call, x)
        module = getattr(layer, keep)
        args, kwargs = _with_hidden(trace.args[keep], trace.kwargs[keep], _apply_norms(layer, pre, x))
        out = module(*args, **kwargs)
        manual = x + _apply_norms(layer, post, out[0] if isinstance(out, tuple) else out)
        if not torch.allclose(y, manual, rtol=1e-4, atol=1e-5 * float(x.abs().max())):
            raise IncompatibleModelsError(
                f"decoder layer {lay.index} ({type(layer).__name__}): with one block removed, the {kind} block "
                f"does not act on the residual stream as x + {keep}(norm(x)); block pruning refuses this model"
            )


def _pre_post(
    order: list[str], own: tuple[str, ...], shared: tuple[str, ...], at: int, other: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The norms a block applies to its input (its own or shared ones called before it, after the other
    block) and to its output (its own ones called after it), in call order."""
    pos = {n: k for k, n in enumerate(order)}
    pre = tuple(
        n
        for n in order
        if n in own + shared and pos[n] < at and (n in shared or not (other < at and pos[n] < other))
    )
    post = tuple(n for n in order if n in own and pos[n] > at)
    return pre, post


def inspect_blocks(model: nn.Module, probe: bool = True) -> BlockLayout:
    """Find every decoder layer's attention and MLP blocks, their norms and sizes; run the exactness probe.

    Raises :class:`IncompatibleModelsError` (naming the layer and the failed check) for models whose blocks
    cannot be removed exactly.
    """
    was_training = model.training
    model.eval()
    layers_path, layers = find_decoder_layers(model)
    traces, calls = _trace_forward(model, layers)
    out_specs = []
    layouts: list[LayerLayout] = []
    seen: set[int] = set()
    for i, layer in enumerate(layers):
        trace = traces[i]
        if not calls[i][0] and "hidden_states" not in calls[i][1]:
            raise IncompatibleModelsError(f"decoder layer {i} was not called in a forward pass")
        attn, mlp, norms = _classify(layer, trace, i)
        x = _hidden_arg(*calls[i]).detach().clone()
        specs = (OutputSpec.of(trace.outputs[attn]), OutputSpec.of(trace.outputs[mlp]))
        with torch.no_grad():
            args, kwargs = _with_hidden(*calls[i], x)
            out_specs.append(OutputSpec.of(layer(*args, **kwargs)))
            dead_a = _dead_norms(layer, calls[i], x, norms, [(attn, "attn", specs[0])])
            dead_m = _dead_norms(layer, calls[i], x, norms, [(mlp, "mlp", specs[1])])
        attn_norms = tuple(n for n in norms if n in dead_a and n not in dead_m)
        mlp_norms = tuple(n for n in norms if n in dead_m and n not in dead_a)
        shared = tuple(n for n in norms if n not in attn_norms and n not in mlp_norms) + tuple(
            n for n, c in layer.named_children() if n not in trace.order and any(True for _ in c.parameters())
        )
        a, m = trace.order.index(attn), trace.order.index(mlp)

        attn_pre, attn_post = _pre_post(trace.order, attn_norms, shared, a, m)
        mlp_pre, mlp_post = _pre_post(trace.order, mlp_norms, shared, m, a)
        children = dict(layer.named_children())
        params = {
            "attn": _param_count([children[n] for n in (attn, *attn_norms)], seen),
            "mlp": _param_count([children[n] for n in (mlp, *mlp_norms)], seen),
            "shared": _param_count([children[n] for n in shared], seen),
        }
        lay = LayerLayout(
            index=i,
            attn=attn,
            mlp=mlp,
            attn_norms=attn_norms,
            mlp_norms=mlp_norms,
            shared=shared,
            attn_pre=attn_pre,
            attn_post=attn_post,
            mlp_pre=mlp_pre,
            mlp_post=mlp_post,
            attn_output=specs[0],
            mlp_output=specs[1],
            params=params,
        )
        if probe:
            with torch.no_grad():
                _probe_layer(layer, lay, calls[i], trace, x)
        layouts.append(lay)
    total = _param_count([model], set())
    if len(set(out_specs)) != 1:
        raise IncompatibleModelsError("decoder layers return different output structures; not supported")
    model.train(was_training)
    return BlockLayout(layers_path=layers_path, layers=layouts, total_params=total, layer_output=out_specs[0])


class BlockMasker:
    """Removes blocks from a model in memory by substituting :class:`ZeroBranch` modules, and puts them back."""

    def __init__(self, model: nn.Module, layout: BlockLayout):
        self.model = model
        self.layout = layout
        self.layers = get_submodule(model, layout.layers_path)
        self._originals: dict[Block, nn.Module] = {}

    @property
    def removed(self) -> frozenset[Block]:
        return frozenset(self._originals)

    def _remove(self, block: Block) -> None:
        lay = self.layout.layers[block.layer]
        layer = self.layers[block.layer]
        name = lay.attn if block.kind == "attn" else lay.mlp
        original = getattr(layer, name)
        spec = lay.attn_output if block.kind == "attn" else lay.mlp_output
        self._originals[block] = original
        setattr(layer, name, ZeroBranch.replacing(original, block.kind, spec))

    def _restore(self, block: Block) -> None:
        lay = self.layout.layers[block.layer]
        name = lay.attn if block.kind == "attn" else lay.mlp
        setattr(self.layers[block.layer], name, self._originals.pop(block))

    def set_removed(self, blocks: Iterable[Block]) -> None:
        """Make exactly ``blocks`` removed."""
        target = set(blocks)
        for b in list(self._originals):
            if b not in target:
                self._restore(b)
        for b in sorted(target - set(self._originals)):
            self._remove(b)

    @contextlib.contextmanager
    def also_removed(self, blocks: Iterable[Block]) -> Iterator[None]:
        """Temporarily remove ``blocks`` on top of the current removals."""
        before = self.removed
        self.set_removed(before | set(blocks))
        try:
            yield
        finally:
            self.set_removed(before)
