"""A llama.cpp GGUF file of the ``llama`` architecture as a Hugging Face config and weights.

MLX reads the file (``mx.load``): F32 and F16 tensors as they are, Q4_0, Q4_1
and Q8_0 as MLX-quantized triples (dequantized here, exactly, to float32),
other types it knows dequantized by MLX itself. llama.cpp stores the q and k
projections' rows in interleaved RoPE order; ``unpermute`` puts them back in
rotate-half order, so the weights are those of the Hugging Face model.

A byte-level BPE tokenizer (``tokenizer.ggml.model`` ``gpt2``, with merges and a
pre-tokenizer llama.cpp names ``gpt2`` or ``smollm``) is rebuilt from the
metadata by ``gguf_tokenizer``: the vocabulary, merges and control tokens are
the file's, so the ids are the model's. Other tokenizers need the model's
Hugging Face tokenizer directory.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

LLAMA_SHAPE = (
    "graft takes LLaMA-architecture checkpoints (model_type llama, or mistral without a "
    "sliding window): bias-free q/k/v/o and gate/up/down projections, RMSNorm, a SiLU MLP "
    "and rotate-half RoPE"
)
GROUP_SIZE = 32  # every GGUF block type MLX keeps quantized has blocks of 32

# llama.cpp tensor names -> Hugging Face names
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF metadata -> Hugging Face config.json
CONFIG_KEYS = {
    "llama.block_count": "num_hidden_layers",
    "llama.embedding_length": "hidden_size",
    "llama.feed_forward_length": "intermediate_size",
    "llama.attention.head_count": "num_attention_heads",
}
OPTIONAL_KEYS = {
    "llama.attention.head_count_kv": "num_key_value_heads",
    "llama.attention.key_length": "head_dim",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "llama.context_length": "max_position_embeddings",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
FLOAT_KEYS = ("rope_theta", "rms_norm_eps")


@dataclass
class GGUF:
    config: dict  # Hugging Face config.json keys (model_type llama)
    weights: dict[str, mx.array]  # Hugging Face names, float, q/k in rotate-half order
    dtype: str  # the stored float dtype; float16 for quantized files
    freq_factors: Optional[mx.array]  # rope_freqs (Llama 3 scaling): inv_freq / factors
    chat_template: Optional[str]
    tokens: Optional[list[str]]  # tokenizer.ggml.tokens
    tokenizer: dict  # the tokenizer.ggml.* metadata, for gguf_tokenizer


def _scalar(metadata: dict, key: str):
    value = metadata.get(key)
    return value.item() if isinstance(value, mx.array) else value


def unpermute(weight: mx.array, n_head: int) -> mx.array:
    """llama.cpp's interleaved q/k rows back to Hugging Face's rotate-half order.

    The inverse of llama.cpp's convert ``permute``: within each head, rows in
    (head_dim/2, 2) order go back to (2, head_dim/2).
    """
    rows, cols = weight.shape
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def dequantize(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """Tensors MLX keeps quantized (a ``.scales`` and ``.biases`` beside them) to float32."""
    out = {}
    for key, value in tensors.items():
        if key.endswith((".scales", ".biases")):
            continue
        base = key.removesuffix(".weight")
        scales = tensors.get(f"{base}.scales")
        if scales is None:
            out[key] = value
            continue
        out[key] = mx.dequantize(
            value,
            scales.astype(mx.float32),  # float32 scales: the dequantized values are exact
            tensors[f"{base}.biases"].astype(mx.float32),
            group_size=GROUP_SIZE,
            bits=value.shape[-1] // scales.shape[-1],
        )
    return out


def _config(file: Path, metadata: dict) -> dict:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu"}
    for gguf, hf in CONFIG_KEYS.items():
        value = _scalar(metadata, gguf)
        if value is None:
            raise ValueError(f"{file}: the GGUF metadata has no {gguf}")
        config[hf] = int(value)
    for gguf, hf in OPTIONAL_KEYS.items():
        value = _scalar(metadata, gguf)
        if value is not None:
            config[hf] = float(value) if hf in FLOAT_KEYS else int(value)
    rope_dims = _scalar(metadata, "llama.rope.dimension_count")
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(
            f"{file}: llama.rope.dimension_count is {rope_dims} but the heads have {head_dim} "
            "dimensions: partial RoPE cannot be grafted"
        )
    if (_scalar(metadata, "llama.expert_count") or 0) > 0:
        raise ValueError(
            f"{file}: llama.expert_count is {_scalar(metadata, 'llama.expert_count')}: a "
            f"mixture of experts cannot be grafted. {LLAMA_SHAPE}."
        )
    kind = _scalar(metadata, "llama.rope.scaling.type")
    if kind not in (None, "none"):
        factor = _scalar(metadata, "llama.rope.scaling.factor")
        if factor is None:
            raise ValueError(f"{file}: llama.rope.scaling.type is {kind!r} but has no factor")
        config["rope_scaling"] = {"rope_type": kind, "factor": float(factor)}
        original = _scalar(metadata, "llama.rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    return config


def _rename(file: Path, weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    renamed, unknown = {}, []
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    for key, value in weights.items():
        if key in GLOBAL_NAMES:
            renamed[GLOBAL_NAMES[key]] = value
            continue
        parts = key.split(".")
        name = LAYER_NAMES.get(parts[2]) if len(parts) == 4 and parts[0] == "blk" else None
        if name is None or parts[3] != "weight":
            unknown.append(key)
            continue
        if parts[2] == "attn_q":
            value = unpermute(value, heads)
        elif parts[2] == "attn_k":
            value = unpermute(value, kv_heads)
        renamed[f"model.layers.{parts[1]}.{name}.weight"] = value
    if unknown:
        listed = ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"{file}: tensors a LLaMA model does not have: {listed}. {LLAMA_SHAPE}.")
    return renamed


def read_gguf(file: Path) -> GGUF:
    """The GGUF ``file`` as a Hugging Face llama config and float weights."""
    try:
        tensors, metadata = mx.load(str(file), return_metadata=True)
    except Exception as e:
        raise ValueError(
            f"{file} cannot be read as GGUF by MLX ({e}). MLX reads F32, F16, Q4_0, Q4_1, "
            "Q8_0 and dequantizes some other types; for another type use a GGUF in one of "
            "those, or the Hugging Face checkpoint"
        ) from e
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{file}: GGUF general.architecture is {arch!r}, not 'llama': it cannot be "
            f"grafted. {LLAMA_SHAPE}."
        )
    config = _config(file, metadata)
    weights = dequantize(tensors)
    freq_factors = weights.pop("rope_freqs.weight", None)
    weights = _rename(file, weights, config)
    if "model.embed_tokens.weight" not in weights:
        raise ValueError(f"{file}: the GGUF has no token_embd.weight")
    config["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    stored = {v.dtype for k, v in tensors.items() if not k.endswith((".scales", ".biases"))}
    floats = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
    dtype = floats.get(stored.pop(), "float16") if len(stored) == 1 else "float16"
    return GGUF(
        config=config,
        weights=weights,
        dtype=dtype,
        freq_factors=freq_factors,
        chat_template=metadata.get("tokenizer.chat_template"),
        tokens=metadata.get("tokenizer.ggml.tokens"),
        tokenizer={k: v for k, v in metadata.items() if k.startswith("tokenizer.ggml.")},
    )


def check_tokens(tokenizer, tokens: list[str], directory: Path) -> None:
    """The tokenizer of ``directory`` must be the GGUF's: the same strings at the same ids."""
    count = len(tokenizer)
    if count > len(tokens):
        raise ValueError(
            f"--tokenizer {directory} has {count} tokens, the GGUF's tokenizer {len(tokens)}: "
            "it is not this model's tokenizer"
        )
    ours = tokenizer.convert_ids_to_tokens(list(range(count)))
    for i, (mine, theirs) in enumerate(zip(ours, tokens)):
        if mine != theirs:
            raise ValueError(
                f"--tokenizer {directory} is not the GGUF's tokenizer: token {i} is {mine!r} "
                f"there and {theirs!r} in the GGUF (tokenizer.ggml.tokens)"
            )


# llama.cpp's tokenizer.ggml.pre -> the pre-tokenizers before byte-level splitting with
# GPT-2's regex: "smollm" (SmolLM, SmolLM2) first isolates every digit
PRE_TOKENIZERS = {"gpt2": (), "smollm": ("digits",)}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def gguf_tokenizer(file: Path, tokenizer: dict, chat_template: Optional[str] = None):
    """The byte-level BPE tokenizer a GGUF's metadata describes, as a transformers tokenizer.

    A GGUF carries everything such a tokenizer is: the token strings at their ids,
    the merges, which tokens are control tokens, the special token ids. Rebuilding
    it saves fetching the Hugging Face tokenizer of a model a GGUF already holds.
    Raises ValueError, naming the key, for a tokenizer it cannot rebuild.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    def need(key: str):
        value = tokenizer.get(f"tokenizer.ggml.{key}")
        if value is None:
            raise ValueError(
                f"{file}: the GGUF metadata has no tokenizer.ggml.{key}, so its tokenizer "
                "cannot be rebuilt: pass --tokenizer DIR, the Hugging Face tokenizer of the model"
            )
        return value

    kind, pre = need("model"), need("pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{file}: the GGUF's tokenizer is tokenizer.ggml.model {kind!r} with "
            f"tokenizer.ggml.pre {pre!r}; graft rebuilds only byte-level BPE ('gpt2') with "
            f"pre-tokenizer {' or '.join(map(repr, PRE_TOKENIZERS))}: pass --tokenizer DIR, "
            "the Hugging Face tokenizer of the model"
        )
    tokens, merges = need("tokens"), need("merges")
    types = need("token_type").tolist()
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{file}: tokenizer.ggml.tokens has repeated tokens")
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    backend = Tokenizer(bpe)
    steps = (
        [pre_tokenizers.Digits(individual_digits=True)] if "digits" in PRE_TOKENIZERS[pre] else []
    )
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [
            AddedToken(text, special=role == CONTROL, normalized=False)
            for text, role in zip(tokens, types)
            if role in (CONTROL, USER_DEFINED)
        ]
    )

    def special(key: str) -> Optional[str]:
        index = _scalar(tokenizer, f"tokenizer.ggml.{key}_token_id")
        return None if index is None else tokens[int(index)]

    bos = special("bos")
    if bos is not None and _scalar(tokenizer, "tokenizer.ggml.add_bos_token"):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        chat_template=chat_template,
    )
