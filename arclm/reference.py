"""BD3LM decoding written plainly, without a cache: what the runtime must equal.

Every denoising step runs the model over the whole sequence (prompt, finished
blocks, the current block) under the block-causal mask, as dLLM's sampler
re-encodes its prefix; the rules are those of ``bd3lm.py`` (docs/arclm.md).
"""

from typing import Iterable, Optional, Sequence

import mlx.core as mx

from optiq_dhara.runtime.sampling import Sampling, choose, log_softmax

from .bd3lm import noise_position, transfer_schedule


def block_causal_mask(length: int, grid: int, phase: int) -> mx.array:
    """[1, 1, length, length] bool: query p sees key j iff j's block is not after p's."""
    block = (mx.arange(length) + phase) // grid
    return (block[None, :] <= block[:, None])[None, None]


def reference_generate(
    model,
    prompt: Sequence[int],
    *,
    max_tokens: int,
    block_len: int,
    steps: Optional[int] = None,
    temperature: float = 0.0,
    seed: Optional[int] = None,
    stop_ids: Iterable[int] = (),
) -> list[int]:
    """The generated ids after ``prompt`` (up to and including a stop id)."""
    mask_id = model.args.mask_token_id
    stops = set(stop_ids)
    sampling = Sampling(temperature=temperature, seed=seed)
    phase = -len(prompt) % block_len  # dLLM left-pads the prompt to whole blocks
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        block = [mask_id] * min(block_len, max_tokens - len(out))
        for j, count in enumerate(transfer_schedule(len(block), steps or block_len)):
            tokens = seq + block
            mask = block_causal_mask(len(tokens), block_len, phase)
            logits = model(mx.array([tokens]), mask=mask)[0, len(seq) :].astype(mx.float32)
            logits = mx.where(mx.arange(logits.shape[-1]) == mask_id, -mx.inf, logits)
            masked = [i for i, t in enumerate(block) if t == mask_id]
            rows = logits[mx.array(masked)]
            positions = [noise_position(j, len(seq) + i) for i in masked]
            predicted = choose(rows, sampling, positions).tolist()
            probs = mx.exp(log_softmax(rows)).tolist()
            confidence = [probs[k][token] for k, token in enumerate(predicted)]
            ranked = sorted(range(len(masked)), key=lambda k: -confidence[k])
            for k in ranked[:count]:
                block[masked[k]] = predicted[k]
        seq += block
        for token in block:
            out.append(token)
            if token in stops:
                return out
    return out
