"""How well a model decodes in the parallel modes: the figures training must keep.

Block diffusion is measured by tokens committed per forward, self-speculation by
draft tokens accepted per round; both greedy, without stop tokens, as ratios of
totals over all prompts.
"""

from typing import Sequence

from optiq_dhara.runtime import decode


def _final_stats(model, prompt: Sequence[int], **options):
    stats = None
    for step in decode(model, prompt, **options):
        stats = step.stats
    return stats


def diffusion_tokens_per_forward(
    model,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    threshold: float = 0.5,
    block_len: int = 32,
) -> float:
    generated = forwards = 0
    for prompt in prompts:
        stats = _final_stats(
            model,
            prompt,
            mode="diffusion",
            max_tokens=max_tokens,
            threshold=threshold,
            block_len=block_len,
        )
        generated, forwards = generated + stats.generated, forwards + stats.forwards
    return generated / max(forwards, 1)


def spec_accepted_per_round(
    model, prompts: Sequence[Sequence[int]], max_tokens: int, k: int = 8, block_len: int = 32
) -> float:
    accepted = rounds = 0
    for prompt in prompts:
        stats = _final_stats(
            model, prompt, mode="spec", max_tokens=max_tokens, k=k, block_len=block_len
        )
        accepted, rounds = accepted + stats.accepted_drafts, rounds + stats.rounds
    return accepted / max(rounds, 1)


def mode_figures(
    model,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    thresholds: Sequence[float] = (0.5, 0.9),
    ks: Sequence[int] = (4, 8),
    block_len: int = 32,
) -> dict[str, float]:
    """``diffusion_tpf_<threshold>`` and ``spec_accepted_k<k>`` for every setting."""
    figures = {}
    for threshold in thresholds:
        figures[f"diffusion_tpf_{threshold}"] = diffusion_tokens_per_forward(
            model, prompts, max_tokens, threshold, block_len
        )
    for k in ks:
        figures[f"spec_accepted_k{k}"] = spec_accepted_per_round(
            model, prompts, max_tokens, k, block_len
        )
    return figures
