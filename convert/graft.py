"""``graft``: a pretrained LLaMA-family model as a dhara checkpoint (Canon taps zero).

The source is a Hugging Face directory or Hub id of a LLaMA-architecture model
(model_type ``llama``, or ``mistral`` without a sliding window), or a GGUF file
of llama.cpp's ``llama`` architecture. The result is a dhara checkpoint that
computes exactly what the source computes in AR mode:

- every Canon site (A, B, C, D) is present with zero taps: with
  ``canon_residual`` on and no activation, a zero conv makes the site the
  identity (``x + 0``); QK-norm and the logit soft-cap are off;
- the embedding (and an untied ``lm_head``) gets one more row, the MASK token
  (``mask_token_id`` = the source's vocabulary size), initialised to the mean of
  the rows: its logit is the mean logit, so it never wins a greedy step; the
  tokenizer gets ``<|mask|>`` at that id (and reserved tokens for any embedding
  rows the source tokenizer does not name), its chat template carried over;
- RoPE: every layer carries its ``inv_freq`` buffer. Default RoPE and YaRN are
  dhara's own (the theta formula, the config's ``rope_scaling``); linear and
  llama3 scaling, and a GGUF's ``rope_freqs`` factors, are written into the
  buffers (``rope_scaling`` then moves to the config's ``graft`` record).

A GGUF file is read by ``gguf.read_gguf``: MLX reads the tensors, quantized ones
are dequantized, and llama.cpp's interleaved q/k rows go back to rotate-half
order. A GGUF's byte-level BPE tokenizer (SmolLM2's, GPT-2's) is rebuilt from
its metadata (``gguf.gguf_tokenizer``); ``tokenizer`` names the Hugging Face
tokenizer directory of the same model instead (checked against the GGUF's token
list), and is needed for other GGUF tokenizers.

Before writing, the grafted model's logits are compared with mlx-lm's llama on
the same weights (``check``); the destination is written atomically.
"""

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from optiq_dhara.checkpoint import MODEL_TYPE
from optiq_dhara.model import Model, ModelArgs, canon_widths
from optiq_dhara.rope import rope_parameters

from .gguf import LLAMA_SHAPE, check_tokens, gguf_tokenizer, read_gguf
from .source import DTYPES, HUB_ID, resolve_source
from .writer import atomic_directory, check_destination

PathLike = Union[str, Path]
MASK_TOKEN = "<|mask|>"
RESERVED_TOKEN = "<|graft_reserved_{}|>"
CANON_KERNEL = 4
GRAFTABLE = ("llama", "mistral")
EXTRA_FILES = ("generation_config.json",)
TOKENIZER_HUB_FILES = ["*.json", "*.txt", "*.jinja", "tokenizer.model"]
CHECK_TOKENS = 16
# max |logit diff| / max(1, max |logit|) the check allows: float32 agrees to ~1e-5
CHECK_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 1e-1}

# Why a model_type is not graftable (the general reason follows in the message).
NOT_LLAMA = {
    "qwen2": "its q/k/v projections have biases",
    "qwen2_moe": "its q/k/v projections have biases and its MLP is a mixture of experts",
    "qwen3": "it normalises q and k before RoPE (dhara's QK-norm comes after RoPE)",
    "qwen3_moe": "it normalises q and k before RoPE and its MLP is a mixture of experts",
    "gemma": "its RMSNorm scales by (1 + weight), it scales the embeddings and uses GELU",
    "gemma2": "its RMSNorm scales by (1 + weight), it soft-caps attention and uses GELU",
    "gemma3": "its RMSNorm scales by (1 + weight), it has QK-norm and sliding windows",
    "gemma3_text": "its RMSNorm scales by (1 + weight), it has QK-norm and sliding windows",
    "mixtral": "its MLP is a mixture of experts",
    "phi3": "its q/k/v and gate/up projections are fused",
    "olmo2": "it normalises q and k over all heads before RoPE",
    "gpt2": "it has learned positions, LayerNorm and biases",
}


@dataclass
class Llama:
    """A source model in Hugging Face names and layout, float, q/k in rotate-half order."""

    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    weights: dict[str, mx.array]
    tokenizer_dir: Optional[Path]  # None: ``tokenizer`` was rebuilt from the GGUF
    kind: str  # "hf" or "gguf"
    model_type: str = "llama"
    rope_scaling: Optional[dict] = None  # yarn: dhara computes it; others go into inv_freq
    max_position_embeddings: Optional[int] = None
    freq_factors: Optional[mx.array] = None  # a GGUF's rope_freqs: inv_freq divided by these
    dtype: Optional[str] = None  # the source's float dtype
    token_ids: dict = field(default_factory=dict)  # bos/eos/pad_token_id
    chat_template: Optional[str] = None  # a GGUF's, used when the tokenizer has none
    gguf_tokens: Optional[list] = None
    tokenizer: Optional[object] = None  # rebuilt from a GGUF's metadata (no tokenizer_dir)
    extra_files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------- sources


def _resolve(src: str, revision: Optional[str]) -> tuple[str, Path]:
    """("gguf", file) or ("hf", directory); a Hub id is downloaded."""
    path = Path(src).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(
                f"source {src} is a file but not a GGUF file (it does not start with 'GGUF'): "
                "give a GGUF file, a Hugging Face checkpoint directory or a Hub id"
            )
        return "gguf", path
    return "hf", resolve_source(src, revision)


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise ValueError(
            f"{file.parent} has no {file.name}: a Hugging Face checkpoint directory holds "
            "config.json, model*.safetensors and the tokenizer files"
        ) from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} is not a JSON object")
    return data


def _check_hf_config(config: dict, file: Union[str, Path]) -> None:
    """Refuse, naming the key and why, what a dhara layer cannot compute."""
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        raise ValueError(
            f"{file}: model_type is {MODEL_TYPE!r}, already a dhara checkpoint: nothing to "
            "graft (use dhara-mlx convert to change its dtype or quantize it)"
        )
    if model_type not in GRAFTABLE:
        reason = NOT_LLAMA.get(model_type)
        architectures = config.get("architectures")
        raise ValueError(
            f"{file}: model_type {model_type!r} (architectures {architectures}) cannot be "
            f"grafted{': ' + reason if reason else ''}. {LLAMA_SHAPE}."
        )
    problems = []
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"{key} is true (dhara's projections have no bias)")
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act != "silu":
        problems.append(f"hidden_act is {act!r} (dhara's MLP is SiLU-gated)")
    if config.get("sliding_window") is not None:
        problems.append(
            f"sliding_window is {config['sliding_window']} (dhara attends to the whole context)"
        )
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append("layer_types has layers other than full_attention")
    if config.get("num_local_experts") or config.get("num_experts"):
        problems.append("it is a mixture of experts")
    if "quantization" in config or "quantization_config" in config:
        problems.append("the checkpoint is quantized: graft the float checkpoint")
    if problems:
        listed = "; ".join(problems)
        raise ValueError(f"{file}: this {model_type} checkpoint cannot be grafted: {listed}")


def _rope_from_hf(config: dict) -> tuple[float, Optional[dict]]:
    """rope_theta and rope_scaling, from transformers 4 keys or 5's ``rope_parameters``."""
    parameters = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    theta = config.get("rope_theta")
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", theta)
        if scaling is None:
            scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        scaling = None if kind == "default" else scaling
    return float(theta if theta is not None else 10_000.0), scaling


LAYER_WEIGHTS = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _check_names(where: str, weights: dict[str, mx.array], layers: int) -> None:
    """Refuse tensors a LLaMA model does not have (biases, extra norms), naming them."""
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    expected |= {f"model.layers.{i}.{n}.weight" for i in range(layers) for n in LAYER_WEIGHTS}
    unknown = sorted(set(weights) - expected)
    if unknown:
        listed = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ValueError(f"{where}: tensors a LLaMA model does not have: {listed}. {LLAMA_SHAPE}.")


def llama_from_config(
    config: dict,
    weights: dict[str, mx.array],
    where: str,
    tokenizer_dir: Optional[Path],
    kind: str,
) -> Llama:
    """A checked ``Llama`` from a Hugging Face config and weights (names as in HF)."""
    _check_hf_config(config, where)
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        intermediate = int(config["intermediate_size"])
    except KeyError as e:
        raise ValueError(f"{where} has no {e.args[0]}: it is not a complete LLaMA config") from e
    weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    tied = config.get("tie_word_embeddings")
    if tied is None:  # transformers' LlamaConfig defaults to untied: the weights decide
        tied = "lm_head.weight" not in weights
    if tied:
        weights.pop("lm_head.weight", None)
    _check_names(where, weights, layers)
    embedding = weights.get("model.embed_tokens.weight")
    if embedding is None:
        raise ValueError(f"{where}: the weights have no model.embed_tokens.weight")
    vocab = int(config.get("vocab_size", embedding.shape[0]))
    if embedding.shape[0] != vocab:
        raise ValueError(
            f"{where}: model.embed_tokens.weight has {embedding.shape[0]} rows but vocab_size "
            f"is {vocab}"
        )
    theta, scaling = _rope_from_hf(config)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return Llama(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=config.get("max_position_embeddings"),
        tie_word_embeddings=bool(tied),
        weights=weights,
        tokenizer_dir=tokenizer_dir,
        kind=kind,
        model_type=config["model_type"],
        dtype=dtype if dtype in DTYPES else None,
        token_ids={
            k: config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if config.get(k) is not None
        },
    )


def read_hf(path: Path, tokenizer: Optional[Path] = None) -> Llama:
    """A Hugging Face checkpoint directory (config.json, model*.safetensors, tokenizer)."""
    file = path / "config.json"
    config = _read_json(file)
    _check_hf_config(config, file)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt*")
        )
        hint = f" (found {', '.join(others[:3])}: save it as safetensors first)" if others else ""
        raise ValueError(f"{path} has no model*.safetensors weights{hint}")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise ValueError(f"{f} cannot be read as safetensors: {e}") from e
    llama = llama_from_config(config, weights, str(file), tokenizer or path, "hf")
    llama.extra_files = [path / name for name in EXTRA_FILES if (path / name).is_file()]
    return llama


def read_gguf_source(file: Path, tokenizer: Optional[Path]) -> Llama:
    """A GGUF file of the llama architecture; its tokenizer is rebuilt unless one is given."""
    gguf = read_gguf(file)
    llama = llama_from_config(gguf.config, gguf.weights, str(file), tokenizer, "gguf")
    llama.dtype = gguf.dtype
    llama.freq_factors = gguf.freq_factors
    llama.chat_template = gguf.chat_template
    llama.gguf_tokens = gguf.tokens
    if tokenizer is None:
        llama.tokenizer = gguf_tokenizer(file, gguf.tokenizer, gguf.chat_template)
    return llama


def _tokenizer_dir(tokenizer: Optional[PathLike]) -> Optional[Path]:
    if tokenizer is None:
        return None
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"--tokenizer {tokenizer} is a file: give the tokenizer's directory")
    if not HUB_ID.match(str(tokenizer)):
        raise ValueError(f"--tokenizer {tokenizer} does not exist (nor is it a Hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(tokenizer), allow_patterns=TOKENIZER_HUB_FILES))
    except Exception as e:  # the hub client raises many types; all mean "not fetched"
        raise ValueError(f"--tokenizer {tokenizer} could not be fetched from the Hub: {e}") from e


# ---------------------------------------------------------------------------- tokenizer


def graft_tokenizer(source: Llama, mask_token: str) -> tuple[object, int]:
    """The source tokenizer with reserved tokens up to the vocabulary and MASK after it.

    Returns the tokenizer and the number of reserved tokens added (embedding rows
    the source tokenizer has no token for).
    """
    from transformers import AddedToken, AutoTokenizer

    where = source.tokenizer_dir or "the GGUF's tokenizer"
    tokenizer = source.tokenizer
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
        except Exception as e:
            raise ValueError(
                f"{source.tokenizer_dir}: the tokenizer cannot be loaded ({e}); graft needs the "
                "Hugging Face tokenizer files (tokenizer.json or tokenizer.model, "
                "tokenizer_config.json)"
            ) from e
    count, vocab = len(tokenizer), source.vocab_size
    if count > vocab:
        raise ValueError(
            f"{where}: the tokenizer has {count} tokens, more than the model's "
            f"{vocab} embedding rows: it is not this model's tokenizer"
        )
    if source.gguf_tokens is not None and source.tokenizer_dir is not None:
        check_tokens(tokenizer, source.gguf_tokens, source.tokenizer_dir)
    if mask_token in tokenizer.get_vocab():
        raise ValueError(
            f"{where}: the tokenizer already has {mask_token!r} (id "
            f"{tokenizer.convert_tokens_to_ids(mask_token)}); name the new MASK token "
            "otherwise (--mask-token)"
        )
    reserved = [
        AddedToken(RESERVED_TOKEN.format(i), special=True, normalized=False)
        for i in range(count, vocab)
    ]
    if reserved:
        tokenizer.add_tokens(reserved, special_tokens=True)
    mask = AddedToken(mask_token, special=True, normalized=False)
    tokenizer.add_special_tokens({"mask_token": mask})
    if tokenizer.mask_token_id != vocab:
        raise RuntimeError(
            f"the tokenizer put {mask_token!r} at id {tokenizer.mask_token_id}, not {vocab}"
        )
    if not getattr(tokenizer, "chat_template", None) and source.chat_template:
        tokenizer.chat_template = source.chat_template
    return tokenizer, len(reserved)


# ---------------------------------------------------------------------------- weights


def _inv_freq(source: Llama) -> tuple[mx.array, Optional[dict]]:
    """Each layer's RoPE inverse frequencies and the rope_scaling dhara's config keeps."""
    scaling = source.rope_scaling
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    dim, theta = source.head_dim, source.rope_theta
    base = 1.0 / (theta ** (mx.arange(0, dim, 2, dtype=mx.float32) / dim))
    if kind is None:
        inv_freq, kept = base, None
    elif kind == "yarn":
        inv_freq, kept = (
            rope_parameters(dim, theta, scaling, source.max_position_embeddings)[0],
            scaling,
        )
    elif kind == "linear":
        inv_freq, kept = base / float(scaling["factor"]), None
    elif kind == "llama3":
        inv_freq, kept = _llama3(base, scaling), None
    else:
        raise ValueError(
            f"rope_scaling of type {kind!r} cannot be grafted: dhara takes default RoPE, "
            "linear, llama3 and yarn scaling"
        )
    if source.freq_factors is not None:
        inv_freq = inv_freq / source.freq_factors.astype(mx.float32)
    return inv_freq.astype(mx.float32), kept


def _llama3(inv_freq: mx.array, scaling: dict) -> mx.array:
    """Llama 3.1's frequency scaling (as transformers and mlx-lm compute it)."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * mx.pi / inv_freq
    scaled = mx.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return mx.where(medium, smoothed, scaled)


def _shape(source: Llama) -> dict:
    """The config fields a LLaMA and its graft share."""
    return {
        "hidden_size": source.hidden_size,
        "num_hidden_layers": source.num_hidden_layers,
        "intermediate_size": source.intermediate_size,
        "num_attention_heads": source.num_attention_heads,
        "num_key_value_heads": source.num_key_value_heads,
        "head_dim": source.head_dim,
        "rms_norm_eps": source.rms_norm_eps,
        "rope_theta": source.rope_theta,
        "tie_word_embeddings": source.tie_word_embeddings,
    }


def dhara_config(source: Llama, dtype: str, kept_scaling: Optional[dict], origin: dict) -> dict:
    config = {
        "architectures": ["DharaARForCausalLM"],
        "model_type": MODEL_TYPE,
        **_shape(source),
        "vocab_size": source.vocab_size + 1,
        "mask_token_id": source.vocab_size,
        "use_qk_norm": False,
        "use_logit_softcap": False,
        "canon_set": "ABCD",
        "canon_kernel": CANON_KERNEL,
        "canon_residual": True,
        "canon_activation": False,
        "canon_bias": False,
        "torch_dtype": dtype,
        "dhara_objective": "ar",  # trained for next-token only, until joint training
        **source.token_ids,
        "graft": origin,
    }
    if kept_scaling is not None:
        config["rope_scaling"] = kept_scaling
    if source.max_position_embeddings is not None:
        config["max_position_embeddings"] = int(source.max_position_embeddings)
    return config


def _with_mask_row(matrix: mx.array, dtype: mx.Dtype) -> mx.array:
    """``matrix`` with one more row, the mean of its rows (its logit: the mean logit)."""
    matrix = matrix.astype(dtype)
    mean = matrix.astype(mx.float32).mean(axis=0, keepdims=True).astype(dtype)
    return mx.concatenate([matrix, mean])


def dhara_weights(
    source: Llama, args: ModelArgs, dtype: mx.Dtype, inv_freq: mx.array, progress: bool
) -> dict[str, mx.array]:
    """The source's weights in ``dtype``, MASK rows added, zero Canon taps, RoPE buffers.

    Consumes ``source.weights`` (so a large model is not held twice).
    """
    from tqdm import tqdm

    weights = {}
    for key in tqdm(list(source.weights), desc="graft", unit="tensor", disable=not progress):
        value = source.weights.pop(key)  # each source tensor is dropped once converted
        if not mx.issubdtype(value.dtype, mx.floating):
            raise ValueError(f"{key} is {value.dtype}, not a float tensor")
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = _with_mask_row(value, dtype)
        else:
            value = value.astype(dtype)
        mx.eval(value)
        weights[key] = value
    widths = canon_widths(args)
    q_width = args.num_attention_heads * args.head_dim
    kv_width = args.num_key_value_heads * args.head_dim
    zeros = {
        "canon_a": widths["a"],
        "canon_c": widths["c"],
        "self_attn.canon_b_q": q_width,
        "self_attn.canon_b_k": kv_width,
        "self_attn.canon_b_v": kv_width,
        "mlp.canon_d": widths["d"],
    }
    for i in range(args.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for site, channels in zeros.items():
            weights[f"{prefix}.{site}.conv.weight"] = mx.zeros((channels, CANON_KERNEL, 1), dtype)
        weights[f"{prefix}.self_attn.rotary_emb.inv_freq"] = inv_freq
    return weights


# ---------------------------------------------------------------------------- check


class FrequencyRoPE(nn.Module):
    """Rotate-half RoPE with explicit inverse frequencies, as mlx-lm's scaled ropes do it."""

    def __init__(self, dims: int, inv_freq: mx.array):
        super().__init__()
        self.dims = dims
        self._freqs = 1.0 / inv_freq

    def __call__(self, x, offset: int = 0):
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )


def reference_logits(
    source: Llama, weights: dict[str, mx.array], inv_freq: mx.array, tokens: mx.array
) -> mx.array:
    """mlx-lm's llama on the grafted weights without the MASK rows (RoPE as the source's)."""
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        **_shape(source),
        "vocab_size": source.vocab_size,
        "rope_scaling": source.rope_scaling,
        "max_position_embeddings": source.max_position_embeddings,
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    vocab = source.vocab_size
    own = [
        (k, v[:vocab] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
        for k, v in weights.items()
        if ".canon_" not in k and not k.endswith("inv_freq")
    ]
    model.load_weights(own, strict=True)
    if source.freq_factors is not None:  # no mlx-lm rope type says this: its frequencies
        for layer in model.model.layers:
            layer.self_attn.rope = FrequencyRoPE(source.head_dim, inv_freq)
    return model(tokens)


def check_logits(model: Model, source: Llama, weights, inv_freq, dtype: str) -> dict:
    """The grafted model's logits against mlx-lm's llama on CHECK_TOKENS tokens."""
    vocab = source.vocab_size
    tokens = mx.array([[(i * 7919 + 11) % vocab for i in range(CHECK_TOKENS)]])
    ours = model(tokens)[..., :vocab].astype(mx.float32)
    theirs = reference_logits(source, weights, inv_freq, tokens).astype(mx.float32)
    diff = mx.abs(ours - theirs).max().item()
    scale = max(1.0, mx.abs(theirs).max().item())
    agree = (ours.argmax(-1) == theirs.argmax(-1)).astype(mx.float32).mean().item()
    result = {"tokens": CHECK_TOKENS, "max_abs_logit_diff": diff, "top1_agreement": agree}
    if diff / scale > CHECK_TOLERANCE[dtype]:
        raise RuntimeError(
            f"the grafted model's logits differ from mlx-lm's llama on the same weights (max "
            f"|diff| {diff:.3g} at logits up to {scale:.3g}): this is a bug of graft; "
            "please report it with the source"
        )
    return result


# ---------------------------------------------------------------------------- graft


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def graft(
    source: str,
    out: PathLike,
    *,
    force: bool = False,
    dtype: Optional[str] = None,
    tokenizer: Optional[PathLike] = None,
    mask_token: str = MASK_TOKEN,
    check: bool = True,
    revision: Optional[str] = None,
    progress: bool = False,
) -> dict:
    """Write ``source`` (HF directory, Hub id or GGUF file) as a dhara checkpoint at ``out``.

    ``tokenizer``: a Hugging Face tokenizer directory or Hub id; replaces the
    source's own (a GGUF's byte-level BPE tokenizer is rebuilt from its metadata,
    other GGUF tokenizers need it). ``dtype``: float16, bfloat16
    or float32 (default: the source's; a quantized GGUF gives float16). ``check``
    compares the logits with mlx-lm's llama before writing. Raises ValueError,
    naming the file, key or value, for a source it cannot graft or a bad
    destination; returns a summary (shapes, vocabulary, check, seconds).
    """
    started = time.perf_counter()
    dst = Path(out).expanduser()
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    local = Path(source).expanduser()
    if local.exists() and _inside(dst, local):
        raise ValueError(f"destination {dst} is the source or inside it: write somewhere else")
    check_destination(dst, force)
    kind, path = _resolve(source, revision)
    tokenizer_dir = _tokenizer_dir(tokenizer)
    for name, given in (("source", path), ("tokenizer", tokenizer_dir)):
        if given is not None and (_inside(dst, given) or _inside(given, dst)):
            raise ValueError(
                f"destination {dst} and the {name} {given} overlap: writing it would replace "
                "the input; write somewhere else"
            )

    if kind == "gguf":
        llama = read_gguf_source(path, tokenizer_dir)
    else:
        llama = read_hf(path, tokenizer_dir)
    new_tokenizer, reserved = graft_tokenizer(llama, mask_token)

    out_dtype = (
        dtype or llama.dtype or _dtype_name(llama.weights["model.embed_tokens.weight"].dtype)
    )
    if out_dtype not in DTYPES:
        out_dtype = "float32"
    inv_freq, kept_scaling = _inv_freq(llama)
    origin = {
        "source": str(source),
        "format": kind,
        "source_model_type": llama.model_type,
        "source_vocab_size": llama.vocab_size,
        "mask_token": mask_token,
    }
    if llama.rope_scaling is not None and kept_scaling is None:
        origin["rope_scaling"] = llama.rope_scaling  # now in every layer's inv_freq
    if llama.freq_factors is not None:
        origin["rope_freqs"] = "GGUF rope_freqs factors, in every layer's inv_freq"
    config = dhara_config(llama, out_dtype, kept_scaling, origin)
    args = ModelArgs.from_dict(config)
    weights = dhara_weights(llama, args, getattr(mx, out_dtype), inv_freq, progress)

    model = Model(args)  # its random initial values are lazy and never computed
    weights = model.sanitize(weights)  # names every missing, unexpected or misshapen tensor
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    checked = check_logits(model, llama, weights, inv_freq, out_dtype) if check else None

    from mlx_lm.utils import load_model, save_config, save_model

    with atomic_directory(dst, force) as tmp:
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        new_tokenizer.save_pretrained(str(tmp))
        for extra in llama.extra_files:
            shutil.copy(extra, tmp / extra.name)
        load_model(tmp, lazy=True)  # the written files load as dhara
    return {
        "source": str(source),
        "format": kind,
        "out": str(dst),
        "dtype": out_dtype,
        "layers": llama.num_hidden_layers,
        "hidden_size": llama.hidden_size,
        "parameters": sum(v.size for k, v in weights.items() if not k.endswith("inv_freq")),
        "source_vocab_size": llama.vocab_size,
        "vocab_size": config["vocab_size"],
        "mask_token_id": config["mask_token_id"],
        "reserved_tokens": reserved,
        "tie_word_embeddings": llama.tie_word_embeddings,
        "check": checked,
        "seconds": time.perf_counter() - started,
    }


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]
