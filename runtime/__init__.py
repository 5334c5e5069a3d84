"""The dhara runtime: AR, block diffusion and self-speculation on one prefix cache.

``decode`` / ``generate_ids`` work on token ids; ``stream_text`` adds the
tokenizer, chat template, stop strings and tool calls; ``generate_batch`` runs
several AR prompts at once.
"""

from .batch import generate_batch
from .decode import decode, generate_ids
from .prefix_cache import PrefixCache
from .sampling import Sampling
from .stats import Stats, Step
from .text import TextChunk, parse_tool_calls, stream_text

__all__ = [
    "PrefixCache",
    "Sampling",
    "Stats",
    "Step",
    "TextChunk",
    "decode",
    "generate_batch",
    "generate_ids",
    "parse_tool_calls",
    "stream_text",
]
