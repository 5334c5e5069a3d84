"""Perplexity of a model on a text file, and how far it moved from a reference.

The measurement itself is ``optiq_dhara.metrics.compare`` (the quantizer's report
uses the same function); this module only turns a text file into token rows and
runs it in AR and in diffusion mode (AR alone for a model without a MASK token).
"""

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx

from optiq_dhara.metrics import Agreement, compare, scoring_modes


def text_rows(tokenizer, path: Path, seq_len: int) -> mx.array:
    """The file's tokens as rows [N, seq_len]; the incomplete last row is dropped.

    A file shorter than ``seq_len`` tokens gives a single row of all its tokens.
    """
    path = Path(path)
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
    if not path.is_file():
        raise ValueError(f"{path}: no such text file (give --perplexity FILE).")
    tokens = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    if len(tokens) < 2:
        raise ValueError(f"{path}: has {len(tokens)} token(s); perplexity needs at least 2.")
    width = min(seq_len, len(tokens))
    rows = len(tokens) // width
    return mx.array(tokens[: rows * width]).reshape(rows, width)


def divergence(
    model,
    reference,
    tokens: mx.array,
    *,
    modes: Optional[Sequence[str]] = None,
    block_len: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    progress: Optional[Callable] = None,
) -> dict:
    """``metrics.compare`` in each mode: ``{mode: {mean_kl, top1_agreement, ...}}``.

    ``modes`` defaults to those the model has (``metrics.scoring_modes``: ar,
    and diffusion with a MASK token); diffusion asked of a model without one is
    refused before any forward. With ``reference`` None the model is its own
    reference: KL 0, agreement 1, and the perplexity is the model's own.
    ``progress``, a tqdm-like class, is called as ``progress(total=rows x modes)``
    and its bar is updated after every batch.
    """
    if reference is not None and reference.args.vocab_size != model.args.vocab_size:
        raise ValueError(
            f"--reference has vocab_size {reference.args.vocab_size} but the model has "
            f"{model.args.vocab_size}; compare a model with its own float or base model."
        )
    modes = list(modes or scoring_modes(model.args))
    if "diffusion" in modes:
        model.args.require_mask("diffusion scoring")
    results = {}
    rows = tokens.shape[0]
    bar = progress(total=rows * len(modes)) if progress is not None else None
    try:
        for mode in modes:
            parts = []
            for start in range(0, rows, batch_size):  # compare's batches, one at a time
                parts.append(
                    compare(
                        model,
                        reference if reference is not None else model,
                        tokens[start : start + batch_size],
                        mode,
                        block_len=block_len,
                        seed=seed + start,
                        batch_size=batch_size,
                    )
                )
                if bar is not None:
                    bar.update(min(batch_size, rows - start))
            agreement = merge(parts)
            results[mode] = {
                **agreement.as_dict(),
                "perplexity_ratio": agreement.perplexity / agreement.reference_perplexity,
            }
    finally:
        if bar is not None:
            bar.close()
    return results


def merge(parts: Sequence[Agreement]) -> Agreement:
    """One Agreement over the positions of all ``parts`` (per-position means weighted)."""
    count = sum(p.positions for p in parts)

    def mean(values) -> float:
        return sum(v * p.positions for v, p in zip(values, parts)) / count

    return Agreement(
        mode=parts[0].mode,
        positions=count,
        mean_kl=mean(p.mean_kl for p in parts),
        top1_agreement=mean(p.top1_agreement for p in parts),
        perplexity=math.exp(mean(math.log(p.perplexity) for p in parts)),
        reference_perplexity=math.exp(mean(math.log(p.reference_perplexity) for p in parts)),
    )


def text_divergence(
    model,
    tokenizer,
    path: Path,
    reference=None,
    *,
    seq_len: int = 512,
    block_len: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    modes: Optional[Sequence[str]] = None,
    progress: Optional[Callable] = None,
) -> dict:
    """The text file's rows, then ``divergence`` on them (``progress`` as there); also
    records the file and sizes."""
    tokens = text_rows(tokenizer, path, seq_len)
    report = divergence(
        model,
        reference,
        tokens,
        modes=modes,
        block_len=block_len,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    return {"file": str(path), "rows": tokens.shape[0], "seq_len": tokens.shape[1], **report}
