"""The token-level entry points: ``decode`` streams steps, ``generate_ids`` collects them."""

from typing import Iterable, Iterator, Mapping, Optional, Sequence

from .engine import Engine, Row
from .prefix_cache import PrefixCache
from .sampling import Sampling
from .settings import Settings, check_prompt
from .stats import Step


def make_request(
    *,
    mode: str = "ar",
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Optional[Mapping[int, float]] = None,
    seed: Optional[int] = None,
    stop_ids: Iterable[int] = (),
    block_len: Optional[int] = None,
    threshold: float = 0.5,
    k: int = 8,
    logprobs: Optional[int] = None,
    steps: Optional[int] = None,
) -> tuple[Settings, Sampling]:
    """The decoding options of one request, checked: its ``Settings`` and ``Sampling``
    (with a concrete seed when sampled). The one list of options that ``decode``,
    ``generate_ids``, ``generate_batch``, the CLI and the server take.

    The penalties and ``logit_bias`` are described at ``sampling.adjust_logits``,
    ``logprobs`` at ``Settings``. Each bad value is a ``ValueError`` naming it.
    """
    stops = frozenset(int(t) for t in stop_ids)
    settings = Settings(mode, max_tokens, stops, block_len, threshold, k, logprobs, steps)
    bias = tuple(sorted((int(t), float(b)) for t, b in (logit_bias or {}).items()))
    sampling = Sampling(
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        seed,
        presence_penalty,
        frequency_penalty,
        bias,
    )
    settings.validate()
    sampling.validate()
    return settings, sampling.with_seed()


def decode(
    model, prompt_ids: Sequence[int], *, prefix_cache: Optional[PrefixCache] = None, **options
) -> Iterator[Step]:
    """Decode after ``prompt_ids``, yielding tokens as soon as they are final.

    ``options`` are ``make_request``'s (``mode``, ``max_tokens``, sampling,
    ``stop_ids``, ``block_len``, ``threshold``, ``k``, ``logprobs``, ``steps``), checked here before the
    first step, as is the mode against the model's modes (diffusion and spec need
    its MASK token). The last step's ``stats.finish_reason`` is "stop" (a stop id
    was generated, and is the last token) or "length" (``max_tokens`` reached).
    With ``prefix_cache`` the run starts from the state of an earlier run that
    shares a prefix with this prompt and leaves its own state there when it
    ends or is closed.
    """
    settings, sampling = make_request(**options)
    prompt = check_prompt(prompt_ids, model.args.vocab_size)
    engine = Engine(model, max_batch=1, prefix_cache=prefix_cache)
    return _run(engine, engine.add(prompt, settings, sampling))  # add: checks now, runs nothing


def _run(engine: Engine, row: Row) -> Iterator[Step]:
    failed = False
    try:
        while not row.done:
            for _, step in engine.step():
                yield step
    except Exception:
        failed = True  # a run that raised may have left its state mid-step: keep none of it
        engine.fail()
        raise
    finally:
        if not failed:
            engine.cancel(row)


def generate_ids(model, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The generated token ids (without the prompt); keyword arguments as ``decode``."""
    return [token for step in decode(model, prompt_ids, **kwargs) for token in step.tokens]
