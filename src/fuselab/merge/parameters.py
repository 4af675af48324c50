"""Resolving recipe parameters for one tensor, with mergekit's semantics.

- A scalar applies everywhere.
- A list of numbers is a *gradient*: it is interpolated linearly over the layer depth ``t`` = i / (L - 1) of
  the tensor's decoder layer (``t = 0`` for tensors outside the layers, e.g. embeddings and the final norm).
  A list of non-numbers picks ``values[int(t * (n - 1))]``.
- A conditional value (or a list of them) applies the first whose ``filter`` is a substring of the tensor
  name (no filter, or ``*``, matches everything).

Settings are looked up along a chain, most specific first: a model's (or slice source's) own ``parameters``,
then its slice's, then the recipe's global ``parameters``; a setting whose filters match nothing falls
through to the next. With ``slices`` the depth ``t`` runs over the layers of each slice.
"""

from __future__ import annotations

import re
from typing import Any

from fuselab.merge.recipe import ConditionalParameter, ParameterSetting

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Index of the decoder layer a tensor belongs to (``model.layers.7.mlp...`` -> 7), else None."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def with_layer(tensor_name: str, index: int) -> str:
    """``tensor_name`` with its decoder-layer number replaced by ``index``."""
    m = _LAYER_RE.search(tensor_name)
    if m is None:
        raise ValueError(f"{tensor_name} is not in a decoder layer")
    return f"{tensor_name[: m.start(1)]}{index}{tensor_name[m.end(1) :]}"


def layer_stack(tensor_name: str) -> str | None:
    """The prefix naming the stack of layers a tensor belongs to (``model.layers.``), else None."""
    m = _LAYER_RE.search(tensor_name)
    return tensor_name[: m.start(1)] if m else None


def layer_fraction(tensor_name: str, num_layers: int) -> float:
    i = layer_index(tensor_name)
    if i is None:
        return 0.0
    return i / (num_layers - 1) if num_layers > 1 else 1.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(setting: ParameterSetting, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for the tensor ``tensor_name`` at layer depth ``t`` (None if no filter matches)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, ConditionalParameter) for e in setting):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        if all(_is_number(e) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    raise TypeError(f"unexpected parameter setting {setting!r}")


Settings = dict[str, ParameterSetting] | None


def lookup(chain: tuple[Settings, ...], name: str, tensor_name: str, t: float) -> Any:
    """The value of parameter ``name`` from the first settings in ``chain`` that give one for this tensor."""
    for settings in chain:
        if settings and name in settings:
            value = evaluate_setting(settings[name], tensor_name, t)
            if value is not None:
                return value
    return None


def setting_endpoints(setting: ParameterSetting) -> list[Any]:
    """Every literal value a setting can produce (to validate types and ranges before any work)."""
    if isinstance(setting, ConditionalParameter):
        return setting_endpoints(setting.value)
    if isinstance(setting, list):
        out: list[Any] = []
        for e in setting:
            out.extend(setting_endpoints(e))
        return out
    return [setting]
