"""The shipped trained fixture: small, complete, and a model that decodes in all three modes."""

import json
from pathlib import Path

import mlx_lm
import pytest

from optiq_dhara.runtime import decode

TRAINED = Path(__file__).parent / "fixtures" / "dhara_tiny_trained"
PROMPT = "class Record:\n\n    def __init__(self, name, value=None):\n        self.name = name"


@pytest.fixture(scope="module")
def trained():
    return mlx_lm.load(str(TRAINED))


def final_stats(model, prompt, **options):
    tokens, stats = [], None
    for step in decode(model, prompt, max_tokens=48, **options):
        tokens += step.tokens
        stats = step.stats
    return tokens, stats


def test_fixture_is_small_and_has_chatml_and_mask_tokens(trained):
    model, tokenizer = trained
    config = json.loads((TRAINED / "config.json").read_text())
    assert sum(p.stat().st_size for p in TRAINED.iterdir()) < 5_000_000
    assert config["hidden_size"] <= 128 and config["vocab_size"] <= 4096
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|mask|>"])
    assert ids[2] == config["mask_token_id"] == model.args.mask_token_id
    assert len(set(ids)) == 3
    figures = json.loads((TRAINED / "figures.json").read_text())
    assert {
        "perplexity",
        "diffusion_tpf_0.5",
        "diffusion_tpf_0.9",
        "spec_accepted_k4",
        "spec_accepted_k8",
    } <= set(figures)


def test_fixture_decodes_in_all_three_modes(trained):
    model, tokenizer = trained
    prompt = tokenizer.encode(PROMPT)
    ar, _ = final_stats(model, prompt, mode="ar")
    spec, spec_stats = final_stats(model, prompt, mode="spec", k=8)
    diffusion, diffusion_stats = final_stats(model, prompt, mode="diffusion")
    # A trained model: AR writes the next line of the body, spec equals AR and
    # accepts drafts, diffusion commits several tokens per forward.
    assert tokenizer.decode(ar).startswith("\n        self.value = value")
    assert spec == ar and spec_stats.accepted_per_round > 1.0
    assert len(diffusion) == 48 and diffusion_stats.tokens_per_forward > 1.5
