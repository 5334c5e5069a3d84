"""arcLM: a Qwen3.5-hybrid checkpoint converted to BD3LM block diffusion.

The layers are mlx-lm's Qwen3.5 ones, used as they are (``mlx_lm.models.qwen3_5``):
the full-attention layers attend under a block-causal mask (bidirectional inside
a block, causal across blocks), the Gated DeltaNet layers stay causal. What this
module adds is the explicit mask, the two-piece call the runtime uses (``model``
for hidden states, ``head`` for the logits it reads) and the diffusion settings
of config.json: ``mask_token_id`` and ``block_size``.

A checkpoint is a Qwen3.5 text checkpoint whose config.json says
``"model_type": "arclm"`` and carries those two keys (docs/arclm.md).
"""

from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5
from mlx_lm.models.base import create_attention_mask

MODES = ("diffusion",)  # BD3LM weights denoise blocks; they are not an AR model


@dataclass
class ModelArgs(qwen3_5.TextModelArgs):
    mask_token_id: Optional[int] = None
    block_size: int = 64  # the BD3LM block the weights were trained with

    def __post_init__(self):
        super().__post_init__()
        if self.mask_token_id is None or not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"config.json: an arcLM checkpoint needs mask_token_id inside the vocabulary "
                f"[0, {self.vocab_size}); got {self.mask_token_id}."
            )
        if self.block_size < 1:
            raise ValueError(f"config.json: block_size must be >= 1, got {self.block_size}.")

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES

    def require_mask(self, what: str) -> int:
        return self.mask_token_id


class Model(nn.Module):
    """The Qwen3.5 text model with block-causal attention, in mlx-lm's weight layout."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.language_model = qwen3_5.TextModel(args)

    @property
    def layers(self) -> list:
        return self.language_model.layers

    def model(self, inputs: mx.array, cache: Optional[list] = None, mask=None) -> mx.array:
        """Final hidden states [B, L, hidden] of ``inputs`` [B, L].

        ``mask`` is the full-attention layers' (a RowCache's, or None: causal);
        the Gated DeltaNet layers read which positions are real from their cache.
        """
        text = self.language_model.model
        h = text.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, cache[text.fa_idx])
        for layer, layer_cache in zip(self.layers, cache):
            if layer.is_linear:  # causal; padding (a row's positions past its tokens) masked
                real = layer_cache.make_mask(h.shape[1]) if layer_cache is not None else None
                h = layer(h, mask=real, cache=layer_cache)
            else:
                h = layer(h, mask=mask, cache=layer_cache)
        return text.norm(h)

    def head(self, h: mx.array) -> mx.array:
        lm = self.language_model
        if self.args.tie_word_embeddings:
            return lm.model.embed_tokens.as_linear(h)
        return lm.lm_head(h)

    def __call__(self, inputs: mx.array, cache: Any = None, mask=None) -> mx.array:
        return self.head(self.model(inputs, cache, mask))

    def make_cache(self) -> list:
        """mlx-lm's caches (for its own tools; the runtime uses ``row_cache``)."""
        return self.language_model.make_cache()

    reuses_prefixes = False  # no prefix cache: a recurrent state cannot be cut back

    @property
    def block_decoding(self):
        """BD3LM with dLLM's sampler semantics (``arclm.bd3lm``), the engine's diffusion mode."""
        from . import bd3lm

        return bd3lm

    def row_cache(self, rows: int = 1):
        """The runtime's cache for ``rows`` rows (``arclm.cache.ArcCache``)."""
        from .cache import ArcCache

        return ArcCache(self, rows)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Qwen3.5's own key handling (conv layout, norm offsets), under ``language_model``."""
        weights = {
            key if key.startswith("language_model.") else f"language_model.{key}": value
            for key, value in weights.items()
        }
        inner = {key[len("language_model.") :]: v for key, v in weights.items()}
        return {f"language_model.{k}": v for k, v in self.language_model.sanitize(inner).items()}

    @property
    def cast_predicate(self):
        return self.language_model.cast_predicate
