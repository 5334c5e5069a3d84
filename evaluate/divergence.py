"""Perplexity of a model on a text file, and how far it moved from a reference.

The measurement itself is ``optiq_dhara.metrics.compare`` (the quantizer's report
uses the same function); this module only turns a text file into token rows and
runs it in AR and in diffusion mode (AR alone for a model without a MASK token).
"""

from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx

from optiq_dhara.metrics import compare, scoring_modes


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
) -> dict:
    """``metrics.compare`` in each mode: ``{mode: {mean_kl, top1_agreement, ...}}``.

    ``modes`` defaults to those the model has (``metrics.scoring_modes``: ar,
    and diffusion with a MASK token); diffusion asked of a model without one is
    refused before any forward. With ``reference`` None the model is its own
    reference: KL 0, agreement 1, and the perplexity is the model's own.
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
    for mode in modes:
        agreement = compare(
            model,
            reference if reference is not None else model,
            tokens,
            mode,
            block_len=block_len,
            seed=seed,
            batch_size=batch_size,
        )
        results[mode] = {
            **agreement.as_dict(),
            "perplexity_ratio": agreement.perplexity / agreement.reference_perplexity,
        }
    return results


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
) -> dict:
    """The text file's rows, then ``divergence`` on them; also records the file and sizes."""
    tokens = text_rows(tokenizer, path, seq_len)
    report = divergence(
        model,
        reference,
        tokens,
        modes=modes,
        block_len=block_len,
        batch_size=batch_size,
        seed=seed,
    )
    return {"file": str(path), "rows": tokens.shape[0], "seq_len": tokens.shape[1], **report}
