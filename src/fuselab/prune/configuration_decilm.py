"""Configuration of block-pruned Llama-family checkpoints in the DeciLM / Nemotron-NAS layout.

Written by fuselab (``fuselab prune``) next to checkpoints whose layers lost their attention or MLP block, and
referenced from ``config.json`` through ``auto_map`` so that ``AutoConfig.from_pretrained(path,
trust_remote_code=True)`` (as vLLM does for ``DeciLMForCausalLM``) reads the per-layer ``block_configs``:

- ``attention.no_op``: the layer has no attention block (and no ``input_layernorm``);
  ``attention.n_heads_in_group``: query heads per KV head, null when there is no attention;
- ``ffn.no_op``: the layer has no MLP block (and no ``post_attention_layernorm``); ``ffn.ffn_mult``: the MLP
  width as ``round_up(int(2 * ffn_mult * hidden_size / 3), 256)``, null when there is no MLP.

Each entry is a ``dict`` that also allows attribute access (``block_configs[i].attention.no_op``), so it
serialises back to the same JSON. This file is fuselab's own, written for this schema; it needs only
transformers.
"""

from transformers import LlamaConfig


class _Section(dict):
    """A dict whose keys are also attributes (what the DeciLM readers expect)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _section(value):
    if isinstance(value, dict):
        return _Section({k: _section(v) for k, v in value.items()})
    return value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_section(dict(b)) for b in (block_configs or [])]
        super().__init__(**kwargs)
