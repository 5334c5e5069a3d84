"""What a decoding run reports: counts and timings that tell how well each mode works."""

import time
from dataclasses import dataclass, field
from typing import Optional

from .sampling import TokenLogprob


@dataclass
class Stats:
    """Counters of one decoding run, updated as it goes.

    ``forwards`` counts the forwards that decode (AR: one per token, its first
    included; the cache-only prefill of the prompt is not counted). ``rounds``
    counts the units a mode works in, each ending in final tokens (AR: tokens,
    diffusion: denoising steps, self-speculation: draft-verify rounds, the
    prompt's forward that gives the first anchor being round 1 with no drafts),
    so ``tokens_per_round`` means the same in every mode and report (for spec
    it is ``1 + accepted_per_round`` unless a stop cuts a round short).
    ``prompt_seconds`` is the prefill up to the first distribution,
    ``decode_seconds`` everything after it.
    """

    mode: str
    prompt_tokens: int = 0
    reused_tokens: int = 0
    generated: int = 0
    forwards: int = 0
    rounds: int = 0
    accepted_drafts: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    first_token_seconds: Optional[float] = None
    finish_reason: Optional[str] = None
    _start: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated / self.forwards if self.forwards else 0.0

    @property
    def accepted_per_round(self) -> float:
        return self.accepted_drafts / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.generated / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding (prefill excluded)."""
        return self.generated / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def time_to_first_token(self) -> Optional[float]:
        """Seconds from the start of the run to the first final token."""
        return self.first_token_seconds

    def prefilled(self) -> None:
        """Mark the end of the prefill."""
        self.prompt_seconds = time.perf_counter() - self._start

    def emitted(self, count: int) -> None:
        """Record ``count`` new final tokens and the time so far."""
        now = time.perf_counter() - self._start
        if count and self.first_token_seconds is None:
            self.first_token_seconds = now
        self.generated += count
        self.decode_seconds = now - self.prompt_seconds


@dataclass
class Step:
    """Tokens that just became final (never MASK), and the run's stats so far.

    Block diffusion also shows its work: ``block`` is the block being denoised
    after this step (MASK id where still masked), starting at position
    ``block_start``; ``committed`` gives, for each of its positions, the step
    (``stats.rounds``) that committed it, or None.
    """

    tokens: list[int]
    stats: Stats
    block: Optional[list[int]] = None
    block_start: int = 0
    committed: Optional[list[Optional[int]]] = None
    logprobs: Optional[list[TokenLogprob]] = None  # one per token, when the request asked
