"""One prompt in all three decoding modes of one set of weights, with what each costs.

    python examples/three_modes.py [MODEL]

MODEL defaults to the small model shipped in this repository.
"""

import sys
from pathlib import Path

import mlx_lm

import optiq_dhara  # noqa: F401  (registers model_type "dhara_ar" with mlx-lm)
from optiq_dhara.runtime import decode

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dhara_tiny_trained"
PROMPT = "class Record:\n\n    def __init__(self, name, value=None):"


def main(model_path: str = str(FIXTURE)) -> None:
    model, tokenizer = mlx_lm.load(model_path)
    prompt = tokenizer.encode(PROMPT)
    for mode in ("ar", "diffusion", "spec"):
        tokens, stats = [], None
        for step in decode(model, prompt, mode=mode, max_tokens=48):
            tokens += step.tokens
            stats = step.stats
        print(f"--- {mode}: {stats.tokens_per_forward:.2f} tokens per forward")
        print(PROMPT + tokenizer.decode(tokens))


if __name__ == "__main__":
    main(*sys.argv[1:])
