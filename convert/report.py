"""Held-out quality of quantized variants against the float model, for the report.

Each variant is scored with ``optiq_dhara.metrics.compare`` in AR and diffusion
mode, and by self-speculation: greedy ``decode(mode="spec", k=8)`` from the
start of each held-out sequence, counting the draft tokens accepted per round.
A model without a MASK token (AR-only) is scored in AR mode alone.
All variants run in float32 arithmetic on their stored values
(``quantize.apply.as_float32``), so the numbers measure the weights, not the
CPU's half-precision kernels.
"""

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from tqdm import tqdm

from optiq_dhara.metrics import compare, scoring_modes
from optiq_dhara.runtime import decode


def spec_acceptance(model: nn.Module, prompts: mx.array, k: int = 8, max_tokens: int = 32) -> dict:
    """Greedy self-speculation from each prompt row: accepted drafts per round, overall."""
    accepted = rounds = generated = 0
    for row in prompts.tolist():
        stats = None
        for step in decode(model, row, mode="spec", k=k, max_tokens=max_tokens):
            stats = step.stats
        accepted += stats.accepted_drafts
        rounds += stats.rounds
        generated += stats.generated
    return {
        "k": k,
        "accepted_per_round": accepted / rounds if rounds else 0.0,
        "tokens_per_round": generated / rounds if rounds else 0.0,
    }


def evaluate_variants(
    reference: nn.Module,
    variants: dict[str, Callable[[], nn.Module]],
    held_out: mx.array,
    *,
    block_len: int = 32,
    prompt_len: int = 32,
    spec_tokens: int = 32,
    seed: int = 0,
) -> dict:
    """``{variant: {"ar": ..., "diffusion": ..., "self_spec": ...}}``; "float" is the reference.

    Each variant is built when its turn comes (and dropped after), so only one
    is in memory beside the reference. A model without a MASK token has "ar" alone.
    """
    modes = scoring_modes(reference.args)
    spec = "spec" in reference.args.modes
    prompts = held_out[:, : min(prompt_len, held_out.shape[1])]
    results: dict = {"float": {}}
    if spec:
        results["float"]["self_spec"] = spec_acceptance(reference, prompts, max_tokens=spec_tokens)
    for name, build in tqdm(variants.items(), desc="Held-out evaluation", leave=False):
        model = build()
        results[name] = {
            mode: compare(
                model, reference, held_out, mode, block_len=block_len, seed=seed
            ).as_dict()
            for mode in modes
        }
        if spec:
            results[name]["self_spec"] = spec_acceptance(model, prompts, max_tokens=spec_tokens)
        for mode in modes:
            results["float"][mode] = {"perplexity": results[name][mode]["reference_perplexity"]}
    return results
