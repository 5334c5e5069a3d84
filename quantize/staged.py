"""Forwards that stop and restart at a decoder layer, and their accounting.

Quantizing one module of layer i changes nothing before layer i, so its effect
on the logits is measured by running layers i.. from the float model's
residual stream at layer i. These functions mirror ``Model.__call__`` of the
model port without a cache; a test checks they give the same logits.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from optiq_dhara.model import rope_tables


def _rope(model: nn.Module, start: int, length: int):
    layers = model.model.layers[start:]
    inv_freqs = mx.stack([layer.self_attn.rotary_emb.inv_freq for layer in layers])
    return rope_tables(inv_freqs, 0, length, model.model.rope_factor)


def run_layers(
    model: nn.Module, h: mx.array, start: int, mask: Optional[mx.array]
) -> list[mx.array]:
    """The residual stream [B, L, D] entering layers start, start+1, .. and leaving the last."""
    if mask is None:
        mask = "causal"
    states = [h]
    if start < len(model.model.layers):
        cos, sin = _rope(model, start, h.shape[1])
        for i, layer in enumerate(model.model.layers[start:]):
            h = layer(h, mask, None, None, (cos[i], sin[i]))
            states.append(h)
    return states


def head(model: nn.Module, h: mx.array) -> mx.array:
    """Logits from the residual stream leaving the last layer."""
    h = model.model.norm(h)
    if model.args.tie_word_embeddings:
        logits = model.model.embed_tokens.as_linear(h)
    else:
        logits = model.lm_head(h)
    cap = model.args.softcap
    return cap * mx.tanh(logits / cap) if cap else logits


def forward_with_states(model: nn.Module, inputs: mx.array, mask: Optional[mx.array]):
    """Logits and the residual stream at every layer boundary (layers + 1 arrays)."""
    states = run_layers(model, model.model.embed_tokens(inputs), 0, mask)
    return head(model, states[-1]), states


def forward_from(model: nn.Module, h: mx.array, start: int, mask: Optional[mx.array]) -> mx.array:
    """Logits from the residual stream ``h`` entering layer ``start``."""
    return head(model, run_layers(model, h, start, mask)[-1])


@dataclass
class ForwardCount:
    """Model forwards spent, in units of one full forward over one sample.

    A forward from layer i costs (layers - i + 1) / (layers + 1): the head counts
    as one layer. A backward counts as two forwards.
    """

    layers: int
    units: float = 0.0

    def forward(self, start: int = 0, samples: int = 1) -> None:
        self.units += samples * (self.layers - start + 1) / (self.layers + 1)

    def backward(self, samples: int = 1) -> None:
        self.units += 2 * samples
