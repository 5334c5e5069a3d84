"""arcLM BD3LM decoding: the cached runtime against the uncached reference of the same
semantics (``optiq_dhara.arclm.reference``), on a random model of Qwen3.5-0.8B's shape.

    python benchmarks/bench_arclm.py [--prompt-len 512] [--max-tokens 64] [--steps 8]

Both decode the same prompt greedily and must give the same tokens (checked);
reported: seconds, generated tokens per second, denoising steps per block and
forwards, and the speed-up. The shape (24 layers, 18 Gated DeltaNet + 6
attention, hidden 1024) follows the Qwen3.5-0.8B text config as published;
the weights are random, so the text is meaningless and only the timing counts.
"""

import argparse
import json
import platform
import time

import mlx.core as mx

from optiq_dhara.arclm.model import Model, ModelArgs
from optiq_dhara.arclm.reference import reference_generate
from optiq_dhara.runtime import decode

QWEN35_08B = {
    "model_type": "arclm",
    "hidden_size": 1024,
    "intermediate_size": 3584,
    "num_hidden_layers": 24,
    "full_attention_interval": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_value_heads": 16,
    "linear_num_key_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "vocab_size": 248320,
    "tie_word_embeddings": True,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
    },
    "mask_token_id": 248319,
    "block_size": 64,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per block")
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    config = {**QWEN35_08B, "num_hidden_layers": args.layers}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    prompt = mx.random.randint(0, 240000, (args.prompt_len,)).tolist()
    block = config["block_size"]

    start = time.perf_counter()
    tokens, last = [], None
    for step in decode(
        model, prompt, mode="diffusion", max_tokens=args.max_tokens, steps=args.steps
    ):
        tokens += step.tokens
        last = step
    cached = time.perf_counter() - start
    start = time.perf_counter()
    expected = reference_generate(
        model, prompt, max_tokens=args.max_tokens, block_len=block, steps=args.steps
    )
    uncached = time.perf_counter() - start
    assert tokens == expected, "the cached runtime differs from the reference"
    blocks = -(-args.max_tokens // block)
    stats = last.stats
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "shape": f"Qwen3.5-0.8B text ({args.layers} layers), random weights",
                "prompt_tokens": args.prompt_len,
                "generated": len(tokens),
                "block_size": block,
                "steps_per_block": stats.rounds / blocks,
                "forwards": stats.forwards,
                "cached_seconds": round(cached, 2),
                "cached_tokens_per_second": round(len(tokens) / cached, 2),
                "cached_prefill_seconds": round(stats.prompt_seconds, 2),
                "uncached_seconds": round(uncached, 2),
                "uncached_tokens_per_second": round(len(tokens) / uncached, 2),
                "speedup": round(uncached / cached, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
