"""BD3LM block diffusion with dLLM's sampler semantics, on the runtime engine.

The rules (docs/arclm.md; ``reference.py`` is the same thing written plainly,
without a cache):

- The block grid ends at the prompt's end: with block size B and a prompt of P
  tokens, positions p and q share a block iff ``(p + f) // B == (q + f) // B``,
  f = ``(-P) % B`` (dLLM left-pads the prompt to whole blocks; padding is
  invisible). Attention is bidirectional inside a block and causal across
  blocks; the Gated DeltaNet layers are causal.
- Each new block is B MASK tokens, the last one cut to what ``max_tokens``
  leaves. A block is denoised in ``steps`` steps (default B): step j commits a
  fixed number of its masked positions, dLLM's linear schedule
  (``transfer_schedule``), those of highest confidence (the lower position on a
  tie). A prediction is the argmax, or with temperature T the Gumbel-max draw,
  noise keyed by (seed, step, position): fresh at every step as in dLLM; its
  confidence is its probability under the model's distribution (MASK excluded).
- A block's tokens are final once committed; decoding ends at a stop token.

Cached: the prompt and every finished block are in the cache once (the KV of
the attention layers, the recurrent state of the GDN layers); a denoising step
runs only the block and keeps nothing of it; when the block is complete one
more forward of its tokens commits it.
"""

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from optiq_dhara.runtime.diffusion import predict_masked, settle
from optiq_dhara.runtime.engine import padded, run_rows
from optiq_dhara.runtime.stats import Step

if TYPE_CHECKING:
    from optiq_dhara.runtime.engine import Group, Row


@lru_cache(maxsize=256)
def transfer_schedule(masked: int, steps: int) -> tuple[int, ...]:
    """How many positions each step commits when ``masked`` positions are denoised in
    ``steps`` steps: dLLM's linear schedule (``get_num_transfer_tokens``, not
    stochastic), steps that commit nothing left out; sums to ``masked``.

    Step j of n commits round(left / (n - j)) of the ``left`` still masked, the
    ratio computed in float32 as dLLM's scheduler does, rounded half to even.
    """
    counts, left = [], masked
    one = np.float32(1.0)
    for j in range(steps):
        t, s = np.float32((steps - j) / steps), np.float32((steps - j - 1) / steps)
        kept = float((one - (one - s)) / (one - (one - t)))  # alpha = 1 - t
        count = min(int(np.round(left * (1.0 - kept))), left)
        left -= count
        counts.append(count)
        if left == 0:
            break
    return tuple(c for c in counts if c > 0)


def noise_position(step: int, position: int) -> int:
    """The noise key's position of ``position`` at denoising step ``step`` of its block."""
    return (step << 32) | position


def block_phase(prompt_length: int, grid: int) -> int:
    """The grid ends at the prompt's end (dLLM pads the prompt to whole blocks)."""
    return -prompt_length % grid


def start_block(row: "Row", mask_id: int) -> None:
    """The next block: ``block_len`` MASK tokens, cut to what max_tokens leaves."""
    length = min(row.grid, row.settings.max_tokens - row.stats.generated)
    row.start, row.block, row.final = len(row.seq), [mask_id] * length, 0
    row.committed, row.block_steps = [], 0


def step(group: "Group") -> list[tuple["Row", Step]]:
    """One denoising step of every row's block; then one forward that commits the
    blocks it completed."""
    model, cache, slots = group.model, group.cache, group.rows
    mask_id = model.args.mask_token_id
    grids = [r.grid if r else 1 for r in slots]
    before = list(cache.lengths)
    blocks = [r.block if r else [0] for r in slots]
    hidden = run_rows(
        model, cache, padded(blocks), [len(b) if r else 0 for b, r in zip(blocks, slots)], grids
    )
    cache.commit(before)
    events, complete = [], []
    for row, masked, tokens, confidence, logprobs in predict_masked(
        model,
        slots,
        hidden,
        [0] * len(slots),
        lambda row, i: noise_position(row.block_steps, row.start + i),
        tempered_confidence=False,
    ):
        schedule = transfer_schedule(len(row.block), row.settings.steps or row.grid)
        count = schedule[row.block_steps]  # the schedule commits the whole block, MASK never wins
        chosen = set(sorted(range(len(masked)), key=lambda j: -confidence[j])[:count])
        row.block_steps += 1
        flags = [j in chosen for j in range(len(masked))]
        events.append((row, settle(row, masked, tokens, flags, logprobs, mask_id)))
        if not row.done and mask_id not in row.block:
            complete.append(row)
    if complete:
        real = [len(r.block) if r in complete else 0 for r in slots]
        run_rows(
            model, cache, padded([r.block if r in complete else [0] for r in slots]), real, grids
        )
        cache.commit([n + k for n, k in zip(cache.lengths, real)])
        for row in complete:
            row.stats.forwards += 1
            start_block(row, mask_id)
    return events
