"""What the engine asks of a model and of its cache: the seams a second architecture plugs into.

The engine (``engine.py``) and the mode steps (``ar.py``, ``spec.py``,
``diffusion.py``) only use what these protocols name. dhara implements them with
``optiq_dhara.model.Model`` and ``optiq_dhara.slot_cache.SlotCache``.
"""

from typing import Optional, Protocol, Sequence

import mlx.core as mx


class ModelArgs(Protocol):
    vocab_size: int
    mask_token_id: Optional[int]  # None: no MASK token, so no diffusion or spec
    num_hidden_layers: int

    @property
    def modes(self) -> tuple[str, ...]:
        """The decoding modes the model has ("ar", and "diffusion" and "spec" with MASK)."""

    def require_mask(self, what: str) -> int:
        """The MASK id, or a ValueError saying that ``what`` needs one and how to get it."""


class DecodingModel(Protocol):
    """A model in two pieces, so a step computes logits only where it reads them."""

    args: ModelArgs

    def model(self, inputs: mx.array, cache: Optional[list], mask: Optional[mx.array]) -> mx.array:
        """Final hidden states [rows, L, hidden] of ``inputs`` [rows, L].

        With ``cache`` (a ``RowCache``'s ``layers``), row b's tokens take the
        positions from the cache's offset for that row on, and their state is
        appended there. ``mask`` [rows, 1, L, keys] is the engine's: the model
        never builds one when it is given, and never rolls the cache back.
        """

    def head(self, hidden: mx.array) -> mx.array:
        """Logits [..., vocab] of hidden states [..., hidden]."""

    # Optional: ``row_cache(rows)`` (its RowCache; default a SlotCache), ``block_decoding``
    # (a BlockDecoding; dhara's is runtime/diffusion.py) and ``reuses_prefixes`` (False:
    # the engine keeps no prefix cache for this model).


class BlockDecoding(Protocol):
    """How a model's block diffusion mode decodes: the engine's "diffusion" group runs
    ``step``; a row's block grid starts at ``block_phase`` (positions p and q share a
    block iff ``(p + phase) // grid == (q + phase) // grid``); ``start_block`` gives a
    row its next block of MASK tokens (``row.start``, ``row.block``)."""

    def step(self, group) -> list: ...

    def block_phase(self, prompt_length: int, grid: int) -> int: ...

    def start_block(self, row, mask_id: int) -> None: ...


class RowCache(Protocol):
    """The state of a batch of rows, each at its own length (``lengths``, host ints).

    A forward goes ``mask = prepare(L, real, grids)``, the model call on
    ``layers``, then ``commit(new_lengths)``: a row may keep any prefix of what
    the forward wrote, so rolling back a rejected draft or a denoising step
    costs nothing. Rows join (``put_row``, ``add_rows``), leave (``keep_rows``)
    and are copied out whole (``take_row``) or cut to any length (``cut``).
    """

    lengths: list[int]
    phases: list[int]  # where each row's block grid starts (0 for dhara)
    layers: list

    def prepare(self, length: int, real: Sequence[int], grids: Sequence[int]) -> mx.array: ...

    def commit(self, lengths: Sequence[int]) -> None: ...

    def put_row(self, row: int, source: "RowCache", source_row: int = 0) -> None: ...

    def take_row(self, row: int) -> "RowCache": ...

    def add_rows(self, count: int) -> None: ...

    def keep_rows(self, rows: Sequence[int]) -> None: ...

    def cut(self, row: int, length: int) -> None: ...

    def state(self) -> list[mx.array]: ...

    def nbytes(self) -> int: ...
