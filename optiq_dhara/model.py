"""dhara (model_type ``dhara_ar``): a LLaMA-style decoder with Canon layers.

Canon layers are causal depthwise convs at four sites of each layer (A before
attention, B on q/k/v, C before the MLP, D inside it). QK-norm comes after RoPE,
the logits are soft-capped, attention is GQA. See SPEC.md of the project.
"""

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)

from .cache import DharaCache, prepare_forward
from .checkpoint import MODEL_TYPE, check_weights
from .rope import rope_parameters

CANON_SITES = "ABCD"
MODES = ("ar", "diffusion", "spec")  # the decoding modes; all but "ar" need the MASK token
# config.json "dhara_objective": what the weights were trained with. "joint" (AR plus
# diffusion: every mode works; the default, as the shipped models were trained) or "ar"
# (next-token only, e.g. a fresh graft: its MASK row and diffusion are untrained)
OBJECTIVES = ("joint", "ar")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = MODEL_TYPE
    hidden_size: int = 768
    num_hidden_layers: int = 32
    intermediate_size: int = 2176
    num_attention_heads: int = 12
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = None
    vocab_size: int = 49155
    mask_token_id: Optional[int] = 49152  # None (or an id outside the vocabulary): AR-only
    rms_norm_eps: float = 1e-6
    rope_theta: float = 8_000_000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: Optional[int] = None
    tie_word_embeddings: bool = True
    use_qk_norm: bool = True
    use_logit_softcap: bool = True
    logit_softcap: Optional[float] = 30.0
    canon_set: str = "ABCD"
    canon_kernel: int = 4
    canon_residual: bool = True
    canon_activation: bool = False
    canon_bias: bool = False
    dhara_objective: str = "joint"

    def __post_init__(self):
        if self.model_type != MODEL_TYPE:
            raise ValueError(
                f"config.json: model_type {self.model_type!r} is not {MODEL_TYPE!r}; "
                "this is not a dhara checkpoint."
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        unknown = sorted(set(self.canon_set) - set(CANON_SITES))
        if unknown:
            raise ValueError(
                f"config.json: canon_set {self.canon_set!r} has unknown letters "
                f"{''.join(unknown)!r}; use a subset of {CANON_SITES!r}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.dhara_objective not in OBJECTIVES:
            raise ValueError(
                f"config.json: dhara_objective {self.dhara_objective!r} is not one of "
                f"{', '.join(OBJECTIVES)} (what the weights were trained with; leave it out "
                "for joint)."
            )
        if self.canon_kernel < 1:
            raise ValueError(f"config.json: canon_kernel must be >= 1, got {self.canon_kernel}.")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ValueError(
                f"config.json: mask_token_id {self.mask_token_id} is not a token id; leave "
                "it out for a checkpoint without a MASK token."
            )
        if self.mask_token_id is not None and self.mask_token_id >= self.vocab_size:
            # no MASK row (dhara-250m-ar-base: 49,152 tokens, the default id 49152): AR-only
            self.mask_token_id = None

    @property
    def modes(self) -> tuple[str, ...]:
        """The decoding modes of this checkpoint: all three with a MASK token, else "ar".

        The one definition every entry point (runtime, server, CLI, training, eval,
        convert) asks.
        """
        return MODES if self.mask_token_id is not None else ("ar",)

    @property
    def trained_modes(self) -> tuple[str, ...]:
        """The modes the weights were trained for: ``modes``, or "ar" alone when
        ``dhara_objective`` is "ar" (a graft before joint training decodes in every
        mode, but only AR well). What the quantizer's sensitivity weighs by default."""
        return ("ar",) if self.dhara_objective == "ar" else self.modes

    def require_mask(self, what: str) -> int:
        """The MASK id, or a ValueError saying that ``what`` needs it and how to get one."""
        if self.mask_token_id is not None:
            return self.mask_token_id
        raise ValueError(
            f"{what} needs the MASK token, and this dhara checkpoint has none: its "
            f"config.json has no mask_token_id inside the vocabulary (vocab_size "
            f"{self.vocab_size}), so it decodes in mode 'ar' only. To make it tri-mode "
            f"(ar, diffusion, spec), add a MASK row to the embedding (vocab_size "
            f"{self.vocab_size + 1}; to lm_head too when untied) and set mask_token_id to "
            f"{self.vocab_size} in config.json, then train with the joint objective "
            "(dhara-mlx lora --objective joint, or dhara-mlx train with --diffusion-weight "
            "above 0) so that the row learns to denoise."
        )

    @property
    def softcap(self) -> Optional[float]:
        return self.logit_softcap if self.use_logit_softcap and self.logit_softcap else None


def canon_conv(
    x, history, site: tuple[int, int], conv: Optional[nn.Module], valid, flags
) -> mx.array:
    """Causal depthwise conv of one canon site over x [B, L, C].

    ``history`` holds the layer's last K-1 canon inputs as pieces along the
    sequence (n rows each, n summing to K-1): an array [B, n, width], in which
    this site's channels start at ``site[1]``, or a tuple of each site's [B, n, C]
    (as a cache kept a forward's inputs), this site's being number ``site[0]``.
    ``conv`` is the site's ``site_conv``: (one [C] array per tap, tap j
    multiplying input t - K + 1 + j; the bias or None), or None when the site is
    off; ``valid``
    [B, K-1+L, 1] says which inputs are tokens (None: all); ``flags`` are
    (residual, activation). Written as multiply-adds over the taps, in
    ``mx.conv1d``'s order (so the sums are the same), because the CPU backend's
    grouped conv is slow at these shapes; a decoded token (L = 1) reads the
    history rows where they are, with no copy. Called inside the compiled
    functions below.
    """
    if conv is None:
        return x
    residual, activation = flags
    index, start = site
    rows = []
    for piece in history:
        part = piece[index] if isinstance(piece, tuple) else piece[..., start : start + x.shape[-1]]
        rows += [part] if part.shape[1] == 1 else [part[:, i : i + 1] for i in range(part.shape[1])]
    rows.append(x)
    if valid is not None:  # left padding of a batch reads as zeros
        rows[:-1] = [mx.where(valid[:, i : i + 1], r, 0) for i, r in enumerate(rows[:-1])]
        rows[-1] = mx.where(valid[:, len(rows) - 1 :], x, 0)
    taps, bias = conv
    kernel, length = len(taps), x.shape[1]
    if length > 1:
        inputs = mx.concatenate(rows, axis=1)
        rows = [inputs[:, j : j + length] for j in range(kernel)]
    y = rows[0] * taps[0]
    for j in range(1, kernel):
        y = y + rows[j] * taps[j]
    if bias is not None:
        y = y + bias
    if activation:
        y = nn.silu(y)
    return x + y if residual else y


def _norm_then_canon(x, norm, eps: float, history, site, conv, valid, flags):
    """RMSNorm, then a canon site: (the normed x, the site's input; the site's output)."""
    normed = mx.fast.rms_norm(x, norm, eps)
    return normed, canon_conv(normed, history, site, conv, valid, flags)


def _add_norm_then_canon(x, update, norm, eps: float, history, site, conv, valid, flags):
    """The residual sum ``x + update``, then ``norm_then_canon`` of it."""
    h = x + update
    normed = mx.fast.rms_norm(h, norm, eps)
    return h, normed, canon_conv(normed, history, site, conv, valid, flags)


def _gate_then_canon(gate, up, history, site, conv, valid, flags):
    """SwiGLU, then canon site D: (the site's input, its output)."""
    u = nn.silu(gate) * up
    return u, canon_conv(u, history, site, conv, valid, flags)


def _canon_b_heads(qkv, history, sites, convs, valid, flags, heads, rope, norms, eps: float):
    """Canon site B over q, k and v, then each as [B, heads, L, head_dim]; RoPE on q
    and k (``rope``: the layer's cos and sin tables), QK-norm after it (``norms``:
    the q and k weights, or None)."""
    out = []
    for i, x in enumerate(qkv):
        x = canon_conv(x, history, sites[i], convs[i], valid, flags)
        B, L, _ = x.shape
        x = x.reshape(B, L, heads[i], -1).transpose(0, 2, 1, 3)
        if i < 2:
            x = apply_rope(x, *rope)
            if norms is not None:
                x = mx.fast.rms_norm(x, norms[i], eps)
        out.append(x)
    return tuple(out)


norm_then_canon = mx.compile(_norm_then_canon)
add_norm_then_canon = mx.compile(_add_norm_then_canon)
gate_then_canon = mx.compile(_gate_then_canon)
canon_b_heads = mx.compile(_canon_b_heads)


def linear_args(module: nn.Module) -> Optional[tuple]:
    """A plain or quantized ``nn.Linear`` as ``project``'s arguments (its arrays and
    its quantization settings); None for any other module (a LoRA layer, say).

    A plain weight comes transposed, as a view made once: a decode step's graph
    then holds no transpose per projection."""
    kind = type(module)
    if kind is nn.Linear:  # the weight transposed once, kept while it is the same array
        weight = module["weight"]
        held = module.__dict__.get("_transposed")
        if held is None or held[0] is not weight:
            held = (weight, weight.T)
            object.__setattr__(module, "_transposed", held)
        return (held[1], module.get("bias"))
    if kind is nn.QuantizedLinear:
        return (
            module["weight"],
            module["scales"],
            module.get("biases"),
            module.get("bias"),
            module.group_size,
            module.bits,
            module.mode,
        )
    return None


def project(x: mx.array, args: tuple) -> mx.array:
    """What the ``nn.Linear`` or ``nn.QuantizedLinear`` of ``linear_args`` computes,
    op for op, callable inside a compiled function (which sees modules as dicts)."""
    if len(args) == 2:
        transposed, bias = args
        return x @ transposed if bias is None else mx.addmm(bias, x, transposed)
    weight, scales, biases, bias, group_size, bits, mode = args
    x = mx.quantized_matmul(
        x,
        weight,
        scales=scales,
        biases=biases,
        transpose=True,
        group_size=group_size,
        bits=bits,
        mode=mode,
    )
    return x if bias is None else x + bias


def _pre_attention(x, history, valid, rope, norm, convs, projections, norms, config: tuple):
    """Site A, the q, k and v projections, site B and the heads (``projections``: the
    three ``linear_args``; ``config``: eps, sites, flags, heads): (A's input, (q, k, v),
    (queries, keys, values))."""
    eps, sites, flags, heads = config
    a_in, a = _norm_then_canon(x, norm, eps, history, sites[0], convs[0], valid, flags)
    qkv = tuple(project(a, p) for p in projections)
    heads = _canon_b_heads(
        qkv, history, sites[1:], convs[1:], valid, flags, heads, rope, norms, eps
    )
    return a_in, qkv, heads


def _post_attention(x, o, history, valid, norm, convs, projections, config: tuple):
    """From the attention's heads ``o`` [B, heads, L, head_dim] to the layer's output:
    o_proj, the residual, site C, the SwiGLU MLP with site D, the residual
    (``projections``: o, gate, up and down as ``linear_args``; ``config``: eps, sites,
    flags). Returns (the output, C's input, D's input)."""
    eps, sites, flags = config
    B, _, L, _ = o.shape
    update = project(o.transpose(0, 2, 1, 3).reshape(B, L, -1), projections[0])
    h, c_in, c = _add_norm_then_canon(
        x, update, norm, eps, history, sites[0], convs[0], valid, flags
    )
    gate, up = project(c, projections[1]), project(c, projections[2])
    d_in, d = _gate_then_canon(gate, up, history, sites[1], convs[1], valid, flags)
    return h + project(d, projections[3]), c_in, d_in


ARRAY = "array"  # where an array was, in ``split_arrays``' skeletons


def split_arrays(tree) -> tuple[tuple, Any]:
    """(The arrays of a nest of tuples in order, the nest with each one replaced by
    ``ARRAY``): the skeleton is hashable and the arrays are all a call has to pass."""
    if isinstance(tree, mx.array):
        return (tree,), ARRAY
    if isinstance(tree, tuple):
        arrays, skeleton = [], []
        for item in tree:
            found, shape = split_arrays(item)
            arrays += found
            skeleton.append(shape)
        return tuple(arrays), tuple(skeleton)
    return (), tree


def fill_arrays(skeleton, arrays: Iterator[mx.array]):
    """The nest ``split_arrays`` took apart, with the next of ``arrays`` at each ``ARRAY``."""
    if skeleton == ARRAY:
        return next(arrays)
    if isinstance(skeleton, tuple):
        return tuple(fill_arrays(item, arrays) for item in skeleton)
    return skeleton


class FusedCall:
    """``body`` compiled for one layout of its parameter arguments (``skeleton``) and one
    ``config`` (``fused_call``); a copy of a model shares it, as it shares the code."""

    __slots__ = ("run",)

    def __init__(self, body: Callable, skeleton: tuple, config: tuple):
        def call(*args):
            *inputs, arrays = args
            return body(*inputs, *fill_arrays(skeleton, iter(arrays)), config)

        self.run = mx.compile(call)

    def __deepcopy__(self, memo: dict) -> "FusedCall":
        return self


@functools.cache
def fused_call(body: Callable, skeleton: tuple, config: tuple) -> FusedCall:
    """One ``FusedCall`` per body, skeleton and config: a call passes the varying inputs
    and the parameters' arrays, nothing else (each argument of a compiled call costs
    host time), and layers alike share one compiled function."""
    return FusedCall(body, skeleton, config)


def keep_plain(module: nn.Module, **values) -> None:
    """Set attributes outside ``module``'s tree: ``nn.Module`` files tuples and dicts
    as its items, read back through its ``__getattr__``, which costs host time on
    every access of a decode step."""
    for name, value in values.items():
        object.__setattr__(module, name, value)


class Canon(nn.Module):
    """Parameters of one canon site: a depthwise ``conv`` (the checkpoint's name)."""

    def __init__(self, channels: int, args: ModelArgs):
        super().__init__()
        self.conv = nn.Conv1d(
            channels, channels, args.canon_kernel, groups=channels, bias=args.canon_bias
        )


def site_conv(module: nn.Module, name: str) -> Optional[tuple[tuple[mx.array, ...], Any]]:
    """The taps of ``module``'s canon site ``name`` for ``canon_conv``: (one contiguous
    [C] array per tap, the bias or None), or None if the site is off.

    The taps are cut from the conv's (C, K, 1) weight once and kept while the
    weight is the same array, so a decode step's graph holds no slicing of it.
    Decoding code reads modules as dict items (``module["x"]``): ``nn.Module``'s
    attribute lookup costs about as much host time as a small op, and a decode
    step's speed on Apple GPUs is its host time.
    """
    canon = module.get(name)
    if canon is None:
        return None
    conv = canon["conv"]
    weight, bias = conv["weight"], conv.get("bias")
    held = canon.__dict__.get("_taps")
    if held is None or held[0] is not weight or held[1] is not bias:
        taps = tuple(mx.contiguous(weight[:, j, 0]) for j in range(weight.shape[1]))
        held = (weight, bias, (taps, bias))
        object.__setattr__(canon, "_taps", held)
    return held[2]


class RotaryEmbedding(nn.Module):
    """Holds the layer's RoPE ``inv_freq`` (frozen; kept in float32)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inv_freq, _ = rope_parameters(
            args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings
        )
        self.freeze()


def rope_tables(inv_freqs: mx.array, offset, length: int, factor: float):
    """cos and signed sin of every layer's RoPE, in one computation.

    Returns two lists, indexed by layer, of [1, B, 1, L, 2, head_dim/2] tables for
    ``apply_rope``. ``offset`` is an int or, for a batch, one offset per row.
    Angles are positions x inv_freq in float32, as the reference computes them.
    The sin table holds -sin for the first half of each head and +sin for the
    second, the signs of rotate-half.
    """
    if isinstance(offset, mx.array) and offset.ndim == 1:
        positions = offset[:, None].astype(mx.float32) + mx.arange(length, dtype=mx.float32)
    else:
        positions = (mx.arange(length, dtype=mx.float32) + offset)[None]
    cos, sin = _rope_angles(positions, inv_freqs, factor)
    layers = inv_freqs.shape[0]
    if layers == 1:
        return [cos], [sin]
    return mx.split(cos, layers), mx.split(sin, layers)


@mx.compile
def _rope_angles(positions: mx.array, inv_freqs: mx.array, factor: float):
    angles = positions[None, :, None, :, None, None] * inv_freqs[:, None, None, None, None, :]
    cos, sin = mx.cos(angles), mx.sin(angles)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, mx.concatenate([-sin, sin], axis=-2)


@mx.compile
def soft_cap(logits: mx.array, cap: float) -> mx.array:
    """``cap * tanh(logits / cap)`` in one pass over the logits (they are the widest
    array of a decode step)."""
    return cap * mx.tanh(logits / cap)


@mx.compile
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half (non-interleaved) RoPE of x [B, H, L, D] with ``rope_tables``' tables.

    With x seen as halves [x1, x2]: [x1 cos - x2 sin, x2 cos + x1 sin].
    """
    shape = x.shape
    halves = x.reshape(*shape[:-1], 2, shape[-1] // 2)
    rotated = halves * cos + halves[..., ::-1, :] * sin
    return rotated.reshape(shape).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = head_dim**-0.5
        self.eps = args.rms_norm_eps
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        has_b = "B" in args.canon_set
        self.canon_b_q = Canon(self.n_heads * head_dim, args) if has_b else None
        self.canon_b_k = Canon(self.n_kv_heads * head_dim, args) if has_b else None
        self.canon_b_v = Canon(self.n_kv_heads * head_dim, args) if has_b else None
        if args.use_qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)
        keep_plain(
            self,
            _heads=(self.n_heads, self.n_kv_heads, self.n_kv_heads),
            _flags=(args.canon_residual, args.canon_activation),
        )

    def __call__(
        self, x, mask, cache: Optional[DharaCache], history, sites: tuple, valid, rope
    ) -> tuple[mx.array, tuple]:
        """The attention output, and canon site B's inputs (q, k, v); ``sites``: where
        q, k and v are in the history (``canon_conv``)."""
        B, L, _ = x.shape
        qkv = (self["q_proj"](x), self["k_proj"](x), self["v_proj"](x))
        queries, keys, values = canon_b_heads(
            qkv, history, sites, self.site_convs(), valid, self._flags, *self.head_args(rope)
        )
        o = self.attend(queries, keys, values, mask, cache)
        return self["o_proj"](o.transpose(0, 2, 1, 3).reshape(B, L, -1)), qkv

    def site_convs(self) -> tuple:
        """Site B's ``site_conv`` for q, k and v."""
        return (
            site_conv(self, "canon_b_q"),
            site_conv(self, "canon_b_k"),
            site_conv(self, "canon_b_v"),
        )

    def head_args(self, rope) -> tuple:
        """``canon_b_heads``' heads, rope, QK-norm weights (or None) and eps."""
        norms = (self["q_norm"]["weight"], self["k_norm"]["weight"]) if "q_norm" in self else None
        return self._heads, rope, norms, self.eps

    def attend(self, queries, keys, values, mask, cache: Optional[DharaCache]) -> mx.array:
        """The heads [B, heads, L, head_dim] of the attention over the cache and these keys."""
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        kv = cache.kv if cache is not None else None
        return scaled_dot_product_attention(
            queries, keys, values, cache=kv, scale=self.scale, mask=mask
        )


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.canon_d = Canon(hidden, args) if "D" in args.canon_set else None
        keep_plain(self, _flags=(args.canon_residual, args.canon_activation))

    def __call__(self, x: mx.array, history, site: tuple, valid) -> tuple[mx.array, mx.array]:
        """The MLP output, and canon site D's input."""
        conv = site_conv(self, "canon_d")
        u, y = gate_then_canon(
            self["gate_proj"](x), self["up_proj"](x), history, site, conv, valid, self._flags
        )
        return self["down_proj"](y), u


def canon_widths(args: ModelArgs) -> dict[str, int]:
    """Channels of each canon site present, in the order the cache stores them."""
    q_width = args.num_attention_heads * args.head_dim
    kv_width = args.num_key_value_heads * args.head_dim
    widths = {
        "a": args.hidden_size if "A" in args.canon_set else 0,
        "b": q_width + 2 * kv_width if "B" in args.canon_set else 0,
        "c": args.hidden_size if "C" in args.canon_set else 0,
        "d": args.intermediate_size if "D" in args.canon_set else 0,
    }
    return {site: width for site, width in widths.items() if width}


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.canon_a = Canon(args.hidden_size, args) if "A" in args.canon_set else None
        self.canon_c = Canon(args.hidden_size, args) if "C" in args.canon_set else None
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        widths = canon_widths(args)
        self._width = sum(widths.values())
        q_width = args.num_attention_heads * args.head_dim
        kv_width = args.num_key_value_heads * args.head_dim
        parts = {"a": widths.get("a", 0), "q": q_width, "k": kv_width, "v": kv_width}
        parts.update(c=widths.get("c", 0), d=widths.get("d", 0))
        if "b" not in widths:
            parts.update(q=0, k=0, v=0)
        sites, index, start = {}, 0, 0
        for name, width in parts.items():  # (number, first channel) of each site stored
            sites[name] = (index, start)
            index, start = index + (width > 0), start + width
        stored = tuple(site in widths for site in "abcd")
        pre_count = stored[0] + 3 * stored[1]  # pieces of sites A and B in a stored tuple
        places = [(None, "canon_a")] * stored[0]
        places += [("self_attn", f"canon_b_{x}") for x in "qkv"] * stored[1]
        places += [(None, "canon_c")] * stored[2] + [("mlp", "canon_d")] * stored[3]
        keep_plain(
            self,
            _sites=sites,
            _qkv_sites=(sites["q"], sites["k"], sites["v"]),
            _pre_sites=(sites["a"], sites["q"], sites["k"], sites["v"]),
            _post_sites=tuple((i - pre_count, start) for i, start in (sites["c"], sites["d"])),
            _pre_count=pre_count,
            _canon_places=tuple(places),
            _stored=stored,
            _flags=(args.canon_residual, args.canon_activation),
        )
        self._all_sites = all(stored)
        self._history_len = args.canon_kernel - 1
        self.eps = args.rms_norm_eps

    def __call__(
        self, x, mask, cache: Optional[DharaCache], valid, rope, zeros: Optional[mx.array] = None
    ) -> mx.array:
        """``zeros`` [B, K-1, canon width]: the canon history before the first token."""
        if zeros is None:
            zeros = mx.zeros((x.shape[0], self._history_len, self._width), x.dtype)
        history = (zeros,) if cache is None else cache.canon_history(zeros)
        fused = self.fused_calls()
        if fused is None:  # a module other than (Quantized)Linear: call the modules
            out, a_in, qkv, c_in, d_in = self._modules_path(x, mask, cache, history, valid, rope)
        else:
            out, a_in, qkv, c_in, d_in = self._fused_path(
                x, mask, cache, history, valid, rope, fused
            )
        if cache is not None:
            if self._all_sites:
                inputs = (a_in, *qkv, c_in, d_in)
            else:
                a_on, b_on, c_on, d_on = self._stored
                inputs = (a_in,) * a_on + qkv * b_on + (c_in,) * c_on + (d_in,) * d_on
            kept = cache.append_canon(history, inputs or (x[..., :0],))
            if kept is not None:
                out = mx.depends(out, kept)
        return out

    def fused_calls(self) -> Optional[tuple]:
        """The layer's two compiled calls and their parameter arrays: ((pre, arrays),
        (post, arrays)); None when a projection is not a plain or quantized
        ``nn.Linear`` (LoRA, say). Made once, kept while the leaf modules hold the
        same arrays (one identity check, instead of a dozen lookups a step)."""
        attention, mlp = self["self_attn"], self["mlp"]
        key = (
            *attention["q_proj"].values(),
            *attention["k_proj"].values(),
            *attention["v_proj"].values(),
            *attention["o_proj"].values(),
            *mlp["gate_proj"].values(),
            *mlp["up_proj"].values(),
            *mlp["down_proj"].values(),
            *self["input_layernorm"].values(),
            *self["post_attention_layernorm"].values(),
        )
        for module, name in self._canon_places:
            key += (*(self if module is None else self[module])[name]["conv"].values(),)
        if "q_norm" in attention:
            key += (*attention["q_norm"].values(), *attention["k_norm"].values())
        held = self.__dict__.get("_fused")
        if held is None or len(held[0]) != len(key) or any(map(_differ, held[0], key)):
            held = (key, self._make_fused_calls(attention, mlp))
            object.__setattr__(self, "_fused", held)
        return held[1]

    def _make_fused_calls(self, attention: nn.Module, mlp: nn.Module) -> Optional[tuple]:
        projections = tuple(
            linear_args(module)
            for module in (
                attention["q_proj"],
                attention["k_proj"],
                attention["v_proj"],
                attention["o_proj"],
                mlp["gate_proj"],
                mlp["up_proj"],
                mlp["down_proj"],
            )
        )
        if None in projections:
            return None
        heads, _, norms, _ = attention.head_args(None)
        convs = (site_conv(self, "canon_a"), *attention.site_convs())
        pre = (self["input_layernorm"]["weight"], convs, projections[:3], norms)
        convs = (site_conv(self, "canon_c"), site_conv(mlp, "canon_d"))
        post = (self["post_attention_layernorm"]["weight"], convs, projections[3:])
        calls = []
        for body, parameters, config in (
            (_pre_attention, pre, (self.eps, self._pre_sites, self._flags, heads)),
            (_post_attention, post, (self.eps, self._post_sites, self._flags)),
        ):
            arrays, skeleton = split_arrays(parameters)
            calls.append((fused_call(body, skeleton, config), arrays))
        return tuple(calls)

    def _fused_path(self, x, mask, cache, history, valid, rope, fused: tuple) -> tuple:
        """The layer in two compiled calls around the attention (every projection a plain
        or quantized Linear): a decode step's host work is its number of calls, ops and
        arguments, so each call gets the history pieces of its own sites only."""
        (pre, pre_arrays), (post, post_arrays) = fused
        split = self._pre_count
        pre_history = tuple(p[:split] if type(p) is tuple else p for p in history)
        post_history = tuple(p[split:] if type(p) is tuple else p for p in history)
        a_in, qkv, (queries, keys, values) = pre.run(x, pre_history, valid, rope, pre_arrays)
        o = self["self_attn"].attend(queries, keys, values, mask, cache)
        out, c_in, d_in = post.run(x, o, post_history, valid, post_arrays)
        return out, a_in, qkv, c_in, d_in

    def _modules_path(self, x, mask, cache, history, valid, rope) -> tuple:
        """The layer through its modules' own calls (LoRA layers and other wrappers)."""
        sites, flags = self._sites, self._flags
        a_in, a = norm_then_canon(
            x,
            self["input_layernorm"]["weight"],
            self.eps,
            history,
            sites["a"],
            site_conv(self, "canon_a"),
            valid,
            flags,
        )
        attention, qkv = self["self_attn"](a, mask, cache, history, self._qkv_sites, valid, rope)
        h, c_in, c = add_norm_then_canon(
            x,
            attention,
            self["post_attention_layernorm"]["weight"],
            self.eps,
            history,
            sites["c"],
            site_conv(self, "canon_c"),
            valid,
            flags,
        )
        mlp, d_in = self["mlp"](c, history, sites["d"], valid)
        return h + mlp, a_in, qkv, c_in, d_in


class DharaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        for layer in self.layers[1:]:  # one array: one RoPE table a forward (``_inv_freqs``)
            layer.self_attn.rotary_emb.inv_freq = self.layers[0].self_attn.rotary_emb.inv_freq
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.canon_width = sum(canon_widths(args).values())
        _, self.rope_factor = rope_parameters(
            args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings
        )

    def __call__(self, inputs, cache=None, mask=None, input_embeddings=None) -> mx.array:
        if cache is not None and isinstance(cache[0], DharaCache):
            shape = (input_embeddings if inputs is None else inputs).shape[:2]
            own_mask = mask is not None or input_embeddings is not None
            prepare_forward(self, cache, inputs, own_mask, shape)
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        first = cache[0]
        if mask is None:
            mask = create_attention_mask(h, first)
        history_len = self.args.canon_kernel - 1
        valid = first.canon_valid(history_len, h.shape[1]) if first is not None else None
        zeros = mx.zeros((h.shape[0], history_len, self.canon_width), h.dtype)
        offset = first.offset if first is not None else 0
        freqs, tables = self._inv_freqs()
        cos, sin = rope_tables(freqs, offset, h.shape[1], self.rope_factor)
        for layer, layer_cache, table in zip(self.layers, cache, tables):
            h = layer(h, mask, layer_cache, valid, (cos[table], sin[table]), zeros)
        return self.norm(h)

    def _inv_freqs(self) -> tuple[mx.array, tuple[int, ...]]:
        """The distinct RoPE ``inv_freq`` arrays of the layers, stacked [n, head_dim/2], and
        which of them each layer uses, kept while the layers hold the same arrays.

        Layers that share one array (a model built here, a checkpoint whose layers
        are equal: ``sanitize``) share one table, so a forward computes one table,
        not one per layer. Modules are read as dict items: attribute access is slow.
        """
        current = tuple(layer["self_attn"]["rotary_emb"]["inv_freq"] for layer in self.layers)
        held = self.__dict__.get("_rope_source")
        if held is None or len(held[0]) != len(current) or any(map(_differ, held[0], current)):
            distinct: list[mx.array] = []
            tables = []
            for array in current:
                number = next((i for i, a in enumerate(distinct) if a is array), len(distinct))
                distinct += [array] if number == len(distinct) else []
                tables.append(number)
            held = (current, mx.stack(distinct), tuple(tables))
            object.__setattr__(self, "_rope_source", held)
        return held[1], held[2]


def _differ(a: mx.array, b: mx.array) -> bool:
    return a is not b


def _shared(inv_freq: mx.array, weights: dict[str, mx.array]) -> mx.array:
    """``inv_freq``, or an equal array already among ``weights``' RoPE buffers (loaded
    once, so the layers share one array and a forward one RoPE table)."""
    for key, value in weights.items():
        if (
            key.endswith("rotary_emb.inv_freq")
            and value.shape == inv_freq.shape
            and mx.array_equal(value, inv_freq).item()
        ):
            return value
    return inv_freq


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DharaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[Any]] = None,
        mask: Optional[mx.array] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits [B, L, vocab]. ``mask`` overrides the causal mask (block diffusion)."""
        return self.head(self.model(inputs, cache, mask, input_embeddings))

    def head(self, h: mx.array) -> mx.array:
        """Soft-capped logits of final hidden states ``h`` [..., hidden].

        Separate from ``__call__`` so a decoder can take the logits of only the
        positions it reads (the head is most of a small model's work per token).
        """
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.args.softcap
        return soft_cap(logits, cap) if cap else logits

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Hugging Face names and layouts to this module tree, then check them all."""
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        sanitized = {}
        for key, value in weights.items():
            if key.endswith(".conv.weight") and value.ndim == 3 and value.shape[1] == 1:
                value = value.transpose(0, 2, 1)  # PyTorch (C, 1, K) -> MLX (C, K, 1)
            if key.endswith("rotary_emb.inv_freq"):
                value = _shared(value.astype(mx.float32), sanitized)
            sanitized[key] = value
        for i, layer in enumerate(self.model.layers):
            key = f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
            sanitized.setdefault(key, layer.self_attn.rotary_emb.inv_freq)
        check_weights(self, sanitized)
        return sanitized

    @property
    def cast_predicate(self):
        """Keep the RoPE frequencies in float32 when converting the dtype."""
        return lambda key: not key.endswith("inv_freq")

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self) -> list[DharaCache]:
        return [DharaCache() for _ in self.layers]
