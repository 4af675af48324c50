"""Turn a GGUF file into a plain Hugging Face checkpoint (recipe C of ``shared/spec/real-models.md``).

transformers can read GGUF files, but a model loaded that way stays tied to its GGUF quantizer: it refuses
``save_pretrained`` and training. We therefore load once, dequantised to bfloat16, detach the quantizer,
apply the fix-ups a given model needs (re-tying embeddings, a chat template, chat stop tokens), save ordinary
safetensors, and check that stock ``AutoModelForCausalLM.from_pretrained`` reloads the result and gives the
same logits. After that, neither GGUF nor the PyPI packages are needed.

torch and transformers are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselab.utils.errors import FuselabError

log = logging.getLogger(__name__)

# A Gemma turn template written for fuselab. Gemma has no system role: a system message is folded into the
# first user turn, as Google's own templates do. Roles must alternate user/assistant after that, since the
# model was trained on strictly alternating turns; anything else is an error rather than a silent rewrite.
GEMMA_CHAT_TEMPLATE = """\
{#- Gemma turns, written for fuselab. Every tag trims the whitespace around it, so the layout of this file
    does not reach the output; the only newlines rendered are the '\\n' literals. -#}
{{- bos_token -}}
{%- set ns = namespace(prefix='', turns=messages) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set ns.prefix = messages[0]['content'] | trim ~ '\\n\\n' -%}
    {%- set ns.turns = messages[1:] -%}
    {%- if not ns.turns -%}
        {{- raise_exception('Gemma chat needs a user message after the system message') -}}
    {%- endif -%}
{%- endif -%}
{%- for message in ns.turns -%}
    {%- if message['role'] not in ['user', 'assistant'] -%}
        {{- raise_exception('Gemma chat supports the roles system (first message only), user and assistant; '
                            ~ 'got ' ~ message['role']) -}}
    {%- endif -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Gemma chat needs turns that alternate user/assistant, starting with user') -}}
    {%- endif -%}
    {{- '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else 'user') ~ '\\n' -}}
    {%- if loop.first -%}{{- ns.prefix -}}{%- endif -%}
    {{- message['content'] | trim ~ '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""

END_OF_TURN = "<end_of_turn>"

SAMPLE_PROMPT = "What is the capital of France?"


@dataclass
class ConversionResult:
    """What a conversion did, for the log and the provenance marker."""

    seconds_load: float
    seconds_save: float
    seconds_verify: float
    fixups: list[str]
    sample: str  # a short greedy continuation of SAMPLE_PROMPT by the reloaded model
    num_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds_load": round(self.seconds_load, 1),
            "seconds_save": round(self.seconds_save, 1),
            "seconds_verify": round(self.seconds_verify, 1),
            "fixups": self.fixups,
            "sample": self.sample,
            "num_parameters": self.num_parameters,
        }


# -- fix-ups ------------------------------------------------------------------------------------------------


def detach_gguf_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model an ordinary, saveable, trainable one.

    Loading with ``GgufConfig(dequantize=True)`` already drops the quantizer in transformers 5.23, but a
    plain ``gguf_file=`` load keeps a ``GgufHfQuantizer`` that makes ``save_pretrained`` raise. The weights
    are dense either way; this removes every trace of the quantizer so the saved config has no
    ``quantization_config`` that would make loaders look for GGUF again.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in _configs(model):
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    if hasattr(model, "quantization_method"):
        delattr(model, "quantization_method")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def check_dense(model: Any) -> None:
    """Refuse to save a model whose weights are not all plain floating tensors (packed GGUF blocks)."""
    import torch

    bad = [
        name
        for name, p in model.named_parameters()
        if type(p) not in (torch.nn.Parameter, torch.Tensor) or not p.is_floating_point()
    ]
    if bad:
        raise FuselabError(
            f"after loading the GGUF, {len(bad)} weights are still packed (e.g. {bad[0]}); this transformers "
            "version did not dequantise them; report it with `pip list` output"
        )


def retie_embeddings(model: Any, tokenizer: Any) -> None:
    """Copy the output projection into the input embedding and tie the two.

    Qwen2.5-0.5B ties its embeddings upstream, but the GGUF stores two copies quantised differently (Q5_0
    embedding, Q8_0 output, about 4.5% apart). The Q8_0 copy is the more precise one; tying to it keeps the
    model's outputs unchanged (perplexity 139.70 -> 139.62) and stores the matrix once.
    """
    import torch

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is None or emb is None:
        raise FuselabError(f"{type(model).__name__} has no separate input/output embeddings to tie")
    if emb.weight.shape != head.weight.shape:
        raise FuselabError(
            f"cannot tie embeddings: input {tuple(emb.weight.shape)} vs output {tuple(head.weight.shape)}"
        )
    if getattr(head, "bias", None) is not None:
        raise FuselabError("cannot tie embeddings: the output projection has a bias")
    with torch.no_grad():
        emb.weight.copy_(head.weight)
    for cfg in _configs(model):
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = True
    # transformers 5 ties from `all_tied_weights_keys`, computed at init from the config; recompute it now
    # that the config says "tied", then make lm_head.weight the very same Parameter as the embedding.
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    model.tie_weights()
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise FuselabError(f"{type(model).__name__}: tying the embeddings did not take effect")


def gemma_chat_template(model: Any, tokenizer: Any) -> None:
    """Attach the Gemma turn template (the GGUF of the base model has none)."""
    for token in ("<start_of_turn>", END_OF_TURN):
        _require_token(tokenizer, token)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE


def stop_on_end_of_turn(model: Any, tokenizer: Any) -> None:
    """Make ``generate`` stop at ``<end_of_turn>`` as well as at ``<eos>``.

    A chat reply ends with ``<end_of_turn>``; without it in ``generation_config.eos_token_id`` a chat
    generation runs on into an invented next turn. The tokenizer's ``eos_token`` stays ``<eos>``: that is the
    document end the base model was trained with.
    """
    end_id = _require_token(tokenizer, END_OF_TURN)
    gen = model.generation_config
    current = gen.eos_token_id
    ids = [] if current is None else ([current] if isinstance(current, int) else list(current))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if end_id not in ids:
        ids.append(end_id)
    gen.eos_token_id = ids


def _require_token(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise FuselabError(
            f"the tokenizer has no {token} token; this fix-up applies to Gemma tokenizers only"
        )
    return int(tid)


def _configs(model: Any) -> list[Any]:
    """The model's config and, for composite models, its text config (without duplicates)."""
    cfgs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None and text is not model.config:
        cfgs.append(text)
    return cfgs


FIXUPS: dict[str, Callable[[Any, Any], None]] = {
    "retie-embeddings": retie_embeddings,
    "gemma-chat-template": gemma_chat_template,
    "stop-on-end-of-turn": stop_on_end_of_turn,
}


def apply_fixups(model: Any, tokenizer: Any, fixups: Sequence[str]) -> None:
    """Detach the quantizer, then run the named fix-ups in order."""
    unknown = [f for f in fixups if f not in FIXUPS]
    if unknown:
        raise FuselabError(f"unknown conversion fix-up {unknown[0]!r}; known: {', '.join(sorted(FIXUPS))}")
    detach_gguf_quantizer(model)
    for name in fixups:
        log.info("fix-up: %s", name)
        FIXUPS[name](model, tokenizer)


# -- loading, saving, verifying -------------------------------------------------------------------------------


def load_gguf(gguf_path: Path, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, with every weight dequantised to ``dtype`` (bf16 by default).

    ``GgufConfig(dequantize=True)`` matters: with the optional ``kernels`` package installed, transformers
    5.23 would otherwise keep the weights packed in GGUF blocks, which cannot be saved or trained.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = dtype or torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.eval()
    return model, tokenizer


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    fixups: Sequence[str] = (),
    dtype: Any = None,
    chat_sample: bool = True,
) -> ConversionResult:
    """Convert ``gguf_path`` into a HF checkpoint in ``out_dir`` (an existing, empty folder) and verify it.

    ``chat_sample=False`` (for base models) makes the verification sample a plain-text prompt instead of a
    chat turn, which base models answer more sensibly.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _quiet_transformers()
    t0 = time.perf_counter()
    log.info("loading %s into transformers (dequantising every weight)", gguf_path.name)
    model, tokenizer = load_gguf(gguf_path, dtype)
    check_dense(model)
    t1 = time.perf_counter()
    log.info("loaded %s in %.1f s", type(model).__name__, t1 - t0)
    apply_fixups(model, tokenizer, fixups)
    save_checkpoint(model, tokenizer, out_dir)
    t2 = time.perf_counter()
    log.info("saved safetensors checkpoint in %.1f s", t2 - t1)
    sample = verify_checkpoint(out_dir, reference=model, chat=chat_sample)
    t3 = time.perf_counter()
    log.info("verified: reloads with AutoModelForCausalLM; greedy sample %r (%.1f s)", sample, t3 - t2)
    n_params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are counted once
    return ConversionResult(t1 - t0, t2 - t1, t3 - t2, list(fixups), sample, n_params)


def save_checkpoint(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """``save_pretrained`` model (safetensors) and tokenizer into ``out_dir``."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "config.json").is_file():
        raise FuselabError(f"save_pretrained wrote no config.json into {out_dir}")
    _normal_permissions(out_dir)


def _normal_permissions(folder: Path) -> None:
    """Give every file the permissions the umask allows: safetensors writes its file via a private temp file
    (mode 0600), which would make a shared cache unreadable for other users."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def verify_checkpoint(
    path: Path, reference: Any = None, max_new_tokens: int = 8, chat: bool | None = None
) -> str:
    """Reload ``path`` with stock transformers, compare logits with ``reference``, and generate a little.

    The prompt goes through the chat template when ``chat`` is true (default: when there is a template).
    Returns the generated text. Raises :class:`FuselabError` when the saved folder does not reload to the
    same model: a conversion that silently changed the weights would poison every later experiment.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if getattr(model, "hf_quantizer", None) is not None:
        raise FuselabError(f"{path} still reloads as a quantized model; the conversion is incomplete")
    use_chat = bool(tokenizer.chat_template) if chat is None else chat and bool(tokenizer.chat_template)
    prompt = _sample_prompt(tokenizer, use_chat)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not use_chat)
    with torch.no_grad():
        if reference is not None:
            ref_device = next(reference.parameters()).device
            ref = reference(**{k: v.to(ref_device) for k, v in inputs.items()}).logits.float().cpu()
            got = model(**inputs).logits.float()
            if ref.shape != got.shape or not torch.allclose(ref, got, atol=1e-2, rtol=1e-2):
                diff = (ref - got).abs().max().item() if ref.shape == got.shape else float("nan")
                raise FuselabError(
                    f"{path}: the saved checkpoint does not reproduce the converted model's logits "
                    f"(max difference {diff:.3g}); the conversion is broken"
                )
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    new = out[0, inputs["input_ids"].shape[1] :]
    if new.numel() == 0:
        raise FuselabError(f"{path}: the reloaded model generated nothing")
    return tokenizer.decode(new, skip_special_tokens=True)


def _sample_prompt(tokenizer: Any, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": SAMPLE_PROMPT}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {SAMPLE_PROMPT}\nAnswer:"


def _quiet_transformers() -> None:
    """Follow FUSELAB_PROGRESS for transformers' own progress bars too."""
    from transformers.utils import logging as hf_logging

    from fuselab.utils.progress import progress_enabled

    if progress_enabled():
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
