"""The knobs of a decoding run, checked once before any model call."""

from dataclasses import dataclass
from typing import Optional, Sequence

from ..model import MODES


@dataclass(frozen=True)
class Settings:
    """Mode, stopping rules and what to report; ``block_len``/``threshold`` are
    diffusion's (and the draft grid of spec), ``k`` is spec's window (anchor + k-1
    drafts); ``steps`` is BD3LM's denoising steps per block (arcLM models);
    ``logprobs`` (None: off) asks for each generated token's
    log-probability with that many likeliest alternatives (``sampling.TokenLogprob``)."""

    mode: str
    max_tokens: int
    stop_ids: frozenset
    block_len: Optional[int] = None  # None: the model's (``default_block_len``)
    threshold: float = 0.5
    k: int = 8
    logprobs: Optional[int] = None  # report each token's logprob and this many alternatives
    steps: Optional[int] = None  # BD3LM (arcLM): denoising steps per block; None: block_len

    def through_stop(self, tokens: list[int]) -> list[int]:
        """``tokens`` up to and including the first stop token."""
        for i, token in enumerate(tokens):
            if token in self.stop_ids:
                return tokens[: i + 1]
        return tokens

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}.")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}.")
        if self.block_len is not None and self.block_len < 1:
            raise ValueError(f"block_len must be >= 1, got {self.block_len}.")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}.")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0 (or None: off), got {self.logprobs}.")
        if self.steps is not None and self.steps < 1:
            raise ValueError(
                f"steps must be >= 1 (or None: one per block position), got {self.steps}."
            )
        if self.k < 2:
            raise ValueError(
                f"k must be >= 2 (the anchor plus at least one draft token), got {self.k}."
            )


DEFAULT_BLOCK_LEN = 32  # dhara's diffusion block (and spec's draft grid)


def default_block_len(args) -> int:
    """The block length a request gets when it names none: the model's own block
    (arcLM's ``block_size``), else dhara's DEFAULT_BLOCK_LEN."""
    return getattr(args, "block_size", DEFAULT_BLOCK_LEN)


def require_mode(args, mode: str) -> None:
    """A ValueError, before any work, when the model (its ``args``) cannot decode in ``mode``:
    diffusion and spec need the MASK token, which an AR-only checkpoint lacks."""
    if mode not in args.modes:
        args.require_mask(f"mode {mode!r}")
        raise ValueError(f"this model decodes in {', '.join(args.modes)}; not in mode {mode!r}.")


def default_mode(args) -> str:
    """The mode a request gets when it names none: spec when the model has it, else its
    first (ar for an AR-only dhara, diffusion for arcLM)."""
    return "spec" if "spec" in args.modes else args.modes[0]


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, what: str = "prompt") -> list[int]:
    """The prompt as a list of ints, or a ValueError naming the bad id."""
    ids = [int(t) for t in prompt_ids]
    if not ids:
        raise ValueError(f"{what} is empty; give at least one token id.")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"{what} has token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
            "was it encoded with this model's tokenizer?"
        )
    return ids
