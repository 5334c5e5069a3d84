"""`graft`: a LLaMA checkpoint (Hugging Face directory, Hub id or GGUF) as a dhara checkpoint.

Sources are made here: a tiny random ``mlx_lm.models.llama`` model with the
golden tokenizer less its ``<|mask|>`` (316 tokens), saved as a Hugging Face
directory, as a float GGUF (``mx.save_gguf``) and as a Q4_1 GGUF (written by
hand below), q and k rows in llama.cpp's interleaved order. The grafted
checkpoint, loaded by stock ``mlx_lm.load``, must give mlx-lm's llama logits on
the source weights (the MASK column aside) and the same greedy tokens.
"""

import json
import shutil
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import write_tokenizer_without_mask
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.convert import source as source_module
from optiq_dhara.convert.gguf import unpermute
from optiq_dhara.convert.graft import _rope_from_hf, graft
from optiq_dhara.runtime import generate_ids

VOCAB = 316  # the golden tokenizer without <|mask|>
PROMPT = "class Record:\n\n    def __init__(self, name, value=None):"
BASE = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=100_000.0,
    max_position_embeddings=2048,
    hidden_act="silu",
    torch_dtype="float32",
    eos_token_id=2,
)
GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
runner = CliRunner()


def invoke(*args):
    """The CLI, wide enough that rich does not wrap a message across its box."""
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


# ---------------------------------------------------------------------------- sources


def write_tokenizer(golden_dir: Path, path: Path) -> None:
    """The golden tokenizer without its <|mask|> (ids 0..315), chat template kept."""
    write_tokenizer_without_mask(golden_dir, path, VOCAB)


def make_llama(golden_dir: Path, path: Path, seed: int = 0, **changes) -> Path:
    """A random tiny LLaMA checkpoint in the Hugging Face layout."""
    config = {**BASE, "vocab_size": VOCAB, "tie_word_embeddings": True, **changes}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # logits of a few units
        if key in weights:
            weights[key] = weights[key] * 4
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(golden_dir, path)
    return path


@pytest.fixture(scope="module")
def source(golden_dir, tmp_path_factory) -> Path:
    return make_llama(golden_dir, tmp_path_factory.mktemp("llama") / "src")


@pytest.fixture(scope="module")
def grafted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("grafted") / "dhara"
    return out, graft(str(source), out)


def logits(path: Path, text: str = PROMPT) -> tuple[mx.array, object]:
    model, tokenizer = mlx_lm.load(str(path))
    ids = mx.array([tokenizer.encode(text)])
    return model(ids), model


def greedy(path: Path, count: int = 24) -> list[int]:
    model, tokenizer = mlx_lm.load(str(path))
    steps = generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=count)
    return [int(token) for token, _ in steps]


def assert_same_model(source: Path, out: Path, vocab: int = VOCAB, atol: float = 1e-4) -> None:
    ours, model = logits(out)
    theirs, reference = logits(source)
    assert type(model).__module__ == "optiq_dhara.model"
    assert type(reference).__module__ == "mlx_lm.models.llama"
    assert ours.shape[-1] == vocab + 1 and theirs.shape[-1] == vocab
    np.testing.assert_allclose(np.array(ours[..., :vocab]), np.array(theirs), atol=atol)
    assert greedy(out) == greedy(source)


# ---------------------------------------------------------------------------- Hugging Face


def test_graft_equals_mlx_lm_llama(source, grafted):
    out, report = grafted
    assert_same_model(source, out)
    assert report["check"]["max_abs_logit_diff"] < 1e-4
    assert report["check"]["top1_agreement"] == 1.0
    assert report["mask_token_id"] == VOCAB and report["vocab_size"] == VOCAB + 1


def test_grafted_checkpoint_is_dhara_with_identity_canon_and_a_mask_token(source, grafted):
    out, _ = grafted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dhara_ar"
    assert config["canon_set"] == "ABCD" and config["canon_residual"] is True
    assert config["canon_activation"] is False
    assert config["use_qk_norm"] is False and config["use_logit_softcap"] is False
    assert config["vocab_size"] == VOCAB + 1 and config["mask_token_id"] == VOCAB
    for key in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "eos_token_id"):
        assert config[key] == BASE[key]
    assert config["head_dim"] == 16 and config["tie_word_embeddings"] is True
    assert config["graft"]["format"] == "hf" and config["graft"]["source_model_type"] == "llama"
    assert config["dhara_objective"] == "ar"  # the quantizer weighs AR alone until joint training

    weights = mx.load(str(out / "model.safetensors"))
    canon = [k for k in weights if ".canon_" in k]
    assert len(canon) == 2 * 6
    assert all(not weights[k].any().item() for k in canon)
    embedding = weights["model.embed_tokens.weight"]
    source_embedding = mx.load(str(source / "model.safetensors"))["model.embed_tokens.weight"]
    assert embedding.shape == (VOCAB + 1, 64) and "lm_head.weight" not in weights
    assert mx.array_equal(embedding[:VOCAB], source_embedding)
    assert mx.allclose(embedding[VOCAB], source_embedding.mean(axis=0), atol=1e-6)
    inv_freq = weights["model.layers.1.self_attn.rotary_emb.inv_freq"]
    expected = 1.0 / (BASE["rope_theta"] ** (mx.arange(0, 16, 2, dtype=mx.float32) / 16))
    assert inv_freq.dtype == mx.float32 and mx.allclose(inv_freq, expected).item()

    model, tokenizer = mlx_lm.load(str(out))
    _, reference = mlx_lm.load(str(source))
    assert model.args.modes == ("ar", "diffusion", "spec") and model.args.trained_modes == ("ar",)
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == VOCAB
    assert tokenizer.encode("a<|mask|>b")[1:2] == [VOCAB]
    assert tokenizer.chat_template == reference.chat_template
    messages = [{"role": "user", "content": "Hello"}]
    assert tokenizer.apply_chat_template(messages) == reference.apply_chat_template(messages)


def test_runtime_modes_on_a_grafted_model(grafted):
    """Self-speculation reproduces AR on the grafted model; diffusion runs (untrained MASK)."""
    out, _ = grafted
    model, tokenizer = mlx_lm.load(str(out))
    ids = tokenizer.encode(PROMPT)
    ar = generate_ids(model, ids, mode="ar", max_tokens=12)
    assert generate_ids(model, ids, mode="spec", max_tokens=12, k=4) == ar
    assert len(generate_ids(model, ids, mode="diffusion", max_tokens=8, block_len=8)) == 8


ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_scaling_is_carried_over(golden_dir, tmp_path, rope):
    """linear and llama3 go into the inv_freq buffers, yarn stays in the config."""
    src = make_llama(golden_dir, tmp_path / "src", seed=1, rope_scaling=ROPES[rope])
    graft(str(src), tmp_path / "out")
    assert_same_model(src, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if rope == "yarn":
        assert config["rope_scaling"] == ROPES[rope]
    else:
        assert "rope_scaling" not in config and config["graft"]["rope_scaling"] == ROPES[rope]


def test_rope_of_transformers_5_configs():
    """transformers 5 writes rope_parameters (theta and scaling) instead of rope_theta."""
    default = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert _rope_from_hf(default) == (5e5, None)
    yarn = {"rope_parameters": {"rope_theta": 1e4, **ROPES["yarn"]}}
    assert _rope_from_hf(yarn) == (1e4, ROPES["yarn"])
    assert _rope_from_hf({"rope_theta": 1e6, "rope_scaling": None}) == (1e6, None)
    assert _rope_from_hf({}) == (1e4, None)  # LLaMA's default theta


def test_untied_head_explicit_head_dim_and_reserved_rows(golden_dir, tmp_path):
    """320 embedding rows for 316 tokens: ids 316..319 become reserved tokens, MASK is 320."""
    src = make_llama(
        golden_dir, tmp_path / "src", seed=2, vocab_size=320, tie_word_embeddings=False, head_dim=32
    )
    report = graft(str(src), tmp_path / "out")
    assert report["reserved_tokens"] == 4 and report["mask_token_id"] == 320
    assert_same_model(src, tmp_path / "out", vocab=320)
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    head = weights["lm_head.weight"]
    assert head.shape == (321, 64)
    assert mx.allclose(head[320], head[:320].mean(axis=0), atol=1e-6)
    _, tokenizer = mlx_lm.load(str(tmp_path / "out"))
    assert tokenizer.convert_tokens_to_ids("<|mask|>") == 320
    assert tokenizer.convert_tokens_to_ids("<|graft_reserved_318|>") == 318


def test_dtype_and_generation_config(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    report = graft(str(src), tmp_path / "out", dtype="bfloat16")
    assert report["dtype"] == "bfloat16" and report["check"]["top1_agreement"] >= 0.9
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == mx.bfloat16
    assert weights["model.layers.0.self_attn.rotary_emb.inv_freq"].dtype == mx.float32
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {
        "eos_token_id": [2, 3]
    }


def test_hub_id_goes_through_snapshot_download(source, tmp_path, monkeypatch):
    calls = []

    def download(repo, revision=None, allow_patterns=None):
        calls.append((repo, revision))
        return str(source)

    monkeypatch.setattr(source_module, "snapshot_download", download)
    graft("someone/tiny-llama", tmp_path / "out", revision="main", check=False)
    assert calls == [("someone/tiny-llama", "main")]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "dhara_ar"


# ---------------------------------------------------------------------------- GGUF


def interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert permute: rotate-half rows to interleaved RoPE order."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(src: Path) -> dict[str, np.ndarray]:
    config = json.loads((src / "config.json").read_text())
    tensors = {}
    for key, value in mx.load(str(src / "model.safetensors")).items():
        value = np.array(value)
        if key in GGUF_GLOBAL:
            tensors[GGUF_GLOBAL[key]] = value
            continue
        _, _, layer, *module, _ = key.split(".")
        name = GGUF_LAYER[".".join(module)]
        if name == "attn_q":
            value = interleave(value, config["num_attention_heads"])
        elif name == "attn_k":
            value = interleave(value, config["num_key_value_heads"])
        tensors[f"blk.{layer}.{name}.weight"] = value
    return tensors


def gguf_metadata(src: Path, tokens: list[str], tokenizer: Optional[dict] = None) -> dict:
    """The llama metadata of ``src``; ``tokenizer``: more tokenizer.ggml keys (merges...)."""
    config = json.loads((src / "config.json").read_text())
    return {
        **(tokenizer or {}),
        "general.architecture": "llama",
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.rope.freq_base": config["rope_theta"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "llama.context_length": config["max_position_embeddings"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.eos_token_id": config["eos_token_id"],
    }


def tokenizer_of(src: Path, pre: str = "gpt2") -> dict:
    """The tokenizer.ggml keys llama.cpp writes for the byte-level BPE tokenizer of ``src``."""
    data = json.loads((src / "tokenizer.json").read_text())
    added = {t["id"] for t in data["added_tokens"] if t["special"]}
    return {
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.merges": [" ".join(pair) for pair in data["model"]["merges"]],
        "tokenizer.ggml.token_type": mx.array([3 if i in added else 1 for i in range(VOCAB)]),
        "tokenizer.ggml.padding_token_id": 0,
    }


def save_float_gguf(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    def value(v):
        if isinstance(v, int):
            return mx.array(v, dtype=mx.uint32)
        if isinstance(v, float):
            return mx.array(v, dtype=mx.float32)
        return v

    arrays = {k: mx.array(v) for k, v in tensors.items()}
    mx.save_gguf(str(path), arrays, {k: value(v) for k, v in metadata.items()})


def q4_1(weight: np.ndarray) -> tuple[bytes, np.ndarray]:
    """GGUF Q4_1 blocks of 32 (f16 scale d, f16 minimum m, 16 bytes of nibbles) and the
    values they decode to (d * q + m)."""
    blocks = weight.reshape(-1, 32).astype(np.float32)
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    d, m = ((high - low) / 15).astype(np.float16), low.astype(np.float16)
    scale, minimum = d.astype(np.float32)[:, None], m.astype(np.float32)[:, None]
    q = np.clip(np.round((blocks - minimum) / np.where(scale == 0, 1, scale)), 0, 15)
    q = q.astype(np.uint8)
    nibbles = q[:, :16] | (q[:, 16:] << 4)  # byte j: element j low, element j + 16 high
    data = b"".join(d[i].tobytes() + m[i].tobytes() + nibbles[i].tobytes() for i in range(len(q)))
    return data, (scale * q + minimum).reshape(weight.shape)


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def gguf_value(value) -> bytes:
    if isinstance(value, str):
        return struct.pack("<I", 8) + gguf_string(value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value)  # uint32
    if isinstance(value, float):
        return struct.pack("<If", 6, value)  # float32
    return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(gguf_string(v) for v in value)


def save_q4_1_gguf(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> dict:
    """A GGUF (version 3) with the 2-D tensors in Q4_1, the rest F32; returns the decoded
    values of each tensor, as a reader must see them."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(gguf_string(k) + gguf_value(v) for k, v in metadata.items())
    infos, blobs, offset, decoded = b"", b"", 0, {}
    for name, array in tensors.items():
        if array.ndim == 2:
            data, decoded[name] = q4_1(array)
            kind = 3  # GGML_TYPE_Q4_1
        else:
            data, decoded[name], kind = array.astype(np.float32).tobytes(), array, 0
        dims = b"".join(struct.pack("<Q", n) for n in reversed(array.shape))
        infos += gguf_string(name) + struct.pack("<I", array.ndim) + dims
        infos += struct.pack("<IQ", kind, offset)
        data += b"\0" * (-len(data) % 32)
        blobs += data
        offset += len(data)
    head = header + infos
    path.write_bytes(head + b"\0" * (-len(head) % 32) + blobs)
    return decoded


def source_tokens(src: Path) -> list[str]:
    _, tokenizer = mlx_lm.load(str(src))
    return tokenizer.convert_ids_to_tokens(list(range(VOCAB)))


def test_float_gguf_equals_the_source(source, tmp_path):
    file = tmp_path / "tiny.gguf"
    save_float_gguf(file, gguf_tensors(source), gguf_metadata(source, source_tokens(source)))
    report = graft(str(file), tmp_path / "out", tokenizer=str(source))
    assert report["format"] == "gguf" and report["dtype"] == "float32"
    assert_same_model(source, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == BASE["eos_token_id"]
    assert config["rope_theta"] == BASE["rope_theta"] and config["tie_word_embeddings"]


def test_gguf_tokenizer_is_rebuilt_from_its_metadata(source, tmp_path):
    """No --tokenizer: the byte-level BPE of the GGUF's metadata gives the source's ids."""
    file = tmp_path / "tiny.gguf"
    metadata = gguf_metadata(source, source_tokens(source), tokenizer_of(source))
    save_float_gguf(file, gguf_tensors(source), metadata)
    graft(str(file), tmp_path / "out")
    assert_same_model(source, tmp_path / "out")
    _, reference = mlx_lm.load(str(source))
    _, rebuilt = mlx_lm.load(str(tmp_path / "out"))
    for text in (PROMPT, "x = [1, 22, 333]  # it's <|im_end|> done\n\n\ty", "émoji 🙂 ok"):
        assert rebuilt.encode(text) == reference.encode(text)
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert rebuilt.eos_token_id == BASE["eos_token_id"] and rebuilt.pad_token == "<|endoftext|>"
    assert rebuilt.convert_tokens_to_ids("<|mask|>") == VOCAB


def test_q4_1_gguf_equals_the_dequantized_source(source, tmp_path):
    """Q4_1 (SmolLM2's GGUF type): MLX reads the blocks, graft dequantizes them exactly."""
    file = tmp_path / "tiny-q4_1.gguf"
    tensors = gguf_tensors(source)
    metadata = gguf_metadata(source, source_tokens(source))
    decoded = save_q4_1_gguf(file, tensors, metadata)
    dequantized = tmp_path / "dequantized"  # the source with the values Q4_1 decodes to
    shutil.copytree(source, dequantized)
    weights = mx.load(str(source / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    for key in weights:
        name = GGUF_GLOBAL.get(key)
        if name is None:
            _, _, layer, *module, _ = key.split(".")
            name = f"blk.{layer}.{GGUF_LAYER['.'.join(module)]}.weight"
        value = decoded[name]
        if name.endswith("attn_q.weight"):  # the inverse of interleave
            value = unpermute(mx.array(value), config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            value = unpermute(mx.array(value), config["num_key_value_heads"])
        weights[key] = mx.array(value)
    mx.save_safetensors(str(dequantized / "model.safetensors"), weights)
    report = graft(str(file), tmp_path / "out", tokenizer=str(source), dtype="float32")
    assert report["check"]["max_abs_logit_diff"] < 1e-4
    assert_same_model(dequantized, tmp_path / "out")
    # quantization moved the logits: the comparison above is not trivially passed
    assert not np.allclose(np.array(logits(source)[0]), np.array(logits(dequantized)[0]), atol=1e-2)


def test_gguf_rope_freqs_equal_llama3_scaling(golden_dir, tmp_path):
    """A Llama 3 GGUF keeps its frequency scaling as a rope_freqs tensor of factors."""
    src = make_llama(golden_dir, tmp_path / "src", seed=3, rope_scaling=ROPES["llama3"])
    reference, _ = mlx_lm.load(str(src))
    periods = reference.model.layers[0].self_attn.rope._freqs  # mlx-lm's Llama3RoPE
    base = BASE["rope_theta"] ** (mx.arange(0, 16, 2, dtype=mx.float32) / 16)
    tensors = {**gguf_tensors(src), "rope_freqs.weight": np.array(periods / base)}
    file = tmp_path / "llama3.gguf"
    save_float_gguf(file, tensors, gguf_metadata(src, source_tokens(src)))
    graft(str(file), tmp_path / "out", tokenizer=str(src))
    assert_same_model(src, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_scaling" not in config and "rope_freqs" in config["graft"]


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        back = unpermute(mx.array(interleave(weight, heads)), heads)
        assert np.array_equal(np.array(back), weight)


def test_gguf_refusals(source, golden_dir, tmp_path):
    tensors, tokens = gguf_tensors(source), source_tokens(source)
    file = tmp_path / "tiny.gguf"
    save_float_gguf(file, tensors, gguf_metadata(source, tokens))
    with pytest.raises(ValueError, match=r"no tokenizer.ggml.pre, so its tokenizer.*--tokenizer"):
        graft(str(file), tmp_path / "out")
    llama3 = tmp_path / "llama3.gguf"
    save_float_gguf(
        llama3, tensors, gguf_metadata(source, tokens, tokenizer_of(source, "llama-bpe"))
    )
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre 'llama-bpe'.*--tokenizer DIR"):
        graft(str(llama3), tmp_path / "out")
    with pytest.raises(ValueError, match=r"has 317 tokens, more than the model's 316"):
        graft(str(file), tmp_path / "out", tokenizer=str(golden_dir))  # it has <|mask|>
    shuffled = tmp_path / "shuffled.gguf"
    save_float_gguf(shuffled, tensors, gguf_metadata(source, tokens[1:] + tokens[:1]))
    with pytest.raises(ValueError, match=r"is not the GGUF's tokenizer: token 0"):
        graft(str(shuffled), tmp_path / "out", tokenizer=str(source))
    qwen = tmp_path / "qwen.gguf"
    save_float_gguf(
        qwen, tensors, {**gguf_metadata(source, tokens), "general.architecture": "qwen2"}
    )
    with pytest.raises(ValueError, match=r"general.architecture is 'qwen2', not 'llama'"):
        graft(str(qwen), tmp_path / "out", tokenizer=str(source))
    biased = tmp_path / "biased.gguf"
    extra = {**tensors, "blk.0.attn_q.bias": np.zeros(64, np.float32)}
    save_float_gguf(biased, extra, gguf_metadata(source, tokens))
    with pytest.raises(ValueError, match=r"tensors a LLaMA model does not have: blk.0.attn_q.bias"):
        graft(str(biased), tmp_path / "out", tokenizer=str(source))
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"is a file but not a GGUF file"):
        graft(str(not_gguf), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- refusals


def with_config(source: Path, path: Path, **changes) -> Path:
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="qwen2"), r"model_type 'qwen2' .* cannot be grafted: its q/k/v .* biases"),
        (dict(model_type="gemma"), r"model_type 'gemma' .* cannot be grafted: its RMSNorm"),
        (dict(model_type="dhara_ar"), r"already a dhara checkpoint"),
        (dict(attention_bias=True), r"attention_bias is true"),
        (dict(hidden_act="gelu"), r"hidden_act is 'gelu'"),
        (dict(model_type="mistral", sliding_window=4096), r"sliding_window is 4096"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"type 'dynamic' cannot"),
        (dict(vocab_size=400), r"has 316 rows but vocab_size is 400"),
        (dict(quantization={"group_size": 64, "bits": 4}), r"quantized: graft the float"),
    ],
)
def test_configs_it_cannot_graft(source, tmp_path, changes, message):
    src = with_config(source, tmp_path / "src", **changes)
    with pytest.raises(ValueError, match=message):
        graft(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no partial directory left behind


def test_missing_files_and_bad_weights(source, tmp_path):
    with pytest.raises(ValueError, match=r"does not exist"):
        graft(str(tmp_path / "nowhere"), tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty has no config.json"):
        graft(str(empty), tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights)
    (no_weights / "model.safetensors").rename(no_weights / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no model\*.safetensors weights \(found pytorch_model"):
        graft(str(no_weights), tmp_path / "out")
    biased = tmp_path / "biased"
    shutil.copytree(source, biased)
    weights = mx.load(str(source / "model.safetensors"))
    weights["model.layers.1.self_attn.k_proj.bias"] = mx.zeros((32,))
    mx.save_safetensors(str(biased / "model.safetensors"), weights)
    with pytest.raises(ValueError, match=r"does not have: model.layers.1.self_attn.k_proj.bias"):
        graft(str(biased), tmp_path / "out")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(source, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    (no_tokenizer / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer cannot be loaded"):
        graft(str(no_tokenizer), tmp_path / "out")
    with pytest.raises(ValueError, match=r"already has '<\|im_end\|>'.*--mask-token"):
        graft(str(source), tmp_path / "out", mask_token="<|im_end|>")
    assert not (tmp_path / "out").exists()


def test_destination_rules(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source, src)
    with pytest.raises(ValueError, match=r"is the source or inside it"):
        graft(str(src), src, force=True)
    with pytest.raises(ValueError, match=r"is the source or inside it"):
        graft(str(src), src / "dhara")
    with pytest.raises(ValueError, match=r"overlap: writing it would replace the input"):
        graft(str(src), tmp_path, force=True)  # the source is inside the destination
    assert (src / "model.safetensors").is_file()

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(ValueError, match=r"already exists: pass --force"):
        graft(str(src), out)
    assert (out / "keep").read_text() == "mine"
    graft(str(src), out, force=True, check=False)
    assert not (out / "keep").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# ---------------------------------------------------------------------------- CLI


def test_cli_grafts_and_reports(source, tmp_path):
    out = tmp_path / "out"
    result = invoke("graft", "--from", str(source), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (float32, 2 layers, hidden 64" in result.stdout
    assert "vocabulary 316 -> 317: MASK is id 316" in result.stdout
    assert "check against mlx-lm's llama on 16 tokens" in result.stdout
    assert_same_model(source, out)

    again = invoke("graft", "--from", str(source), "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    forced = invoke(
        "graft", "--from", str(source), "--out", str(out), "--force", "--dtype", "float16"
    )
    assert forced.exit_code == 0, forced.output
    assert "(float16," in forced.stdout


def test_cli_refusals_and_help(source, tmp_path):
    qwen = with_config(source, tmp_path / "qwen", model_type="qwen2")
    result = invoke("graft", "--from", str(qwen), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "qwen2" in result.output
    file = tmp_path / "tiny.gguf"
    save_float_gguf(file, gguf_tensors(source), gguf_metadata(source, source_tokens(source)))
    result = invoke("graft", "--from", str(file), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "--tokenizer" in result.output
    result = invoke("graft", "--from", file, "--out", tmp_path / "out", "--tokenizer", source)
    assert result.exit_code == 0, result.output
    assert "from GGUF" in result.stdout
    help_text = invoke("graft", "--help").output
    for part in ("--from", "--out", "--tokenizer", "--force", "--dtype", "GGUF", "MASK"):
        assert part in help_text
