"""The token-level entry points: ``decode`` streams steps, ``generate_ids`` collects them."""

from typing import Iterable, Iterator, Optional, Sequence

from .ar import decode_ar
from .diffusion import decode_diffusion
from .prefix_cache import PrefixCache
from .sampling import Sampling
from .settings import Settings, check_prompt
from .spec import decode_spec
from .stats import Stats, Step

_DECODERS = {"ar": decode_ar, "diffusion": decode_diffusion, "spec": decode_spec}


def decode(
    model,
    prompt_ids: Sequence[int],
    *,
    mode: str = "ar",
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seed: Optional[int] = None,
    stop_ids: Iterable[int] = (),
    block_len: int = 32,
    threshold: float = 0.5,
    k: int = 8,
    prefix_cache: Optional[PrefixCache] = None,
) -> Iterator[Step]:
    """Decode after ``prompt_ids``, yielding tokens as soon as they are final.

    The arguments are checked here, before the first step. The last step's
    ``stats.finish_reason`` is "stop" (a stop id was generated, and is the last
    token) or "length" (``max_tokens`` reached). With ``prefix_cache`` the run
    starts from the state of the previous run that shares a prefix with this
    prompt and leaves its own state there when it ends or is closed.
    """
    settings = Settings(
        mode, max_tokens, frozenset(int(t) for t in stop_ids), block_len, threshold, k
    )
    sampling = Sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    settings.validate()
    sampling.validate()
    prompt = check_prompt(prompt_ids, model.args.vocab_size)
    return _run(model, prompt, settings, sampling.with_seed(), prefix_cache)


def _run(model, prompt, settings: Settings, sampling: Sampling, prefix_cache) -> Iterator[Step]:
    grid = settings.block_len if settings.mode == "diffusion" else None
    cache = prefix_cache.take(model, prompt, grid) if prefix_cache else model.make_cache()
    stats = Stats(settings.mode, prompt_tokens=len(prompt), reused_tokens=cache[0].offset)
    seq = list(prompt)
    failed = False  # a run that raised may have left the cache mid-step: do not keep it
    try:
        yield from _DECODERS[settings.mode](model, cache, seq, sampling, settings, stats)
    except Exception:
        failed = True
        raise
    finally:
        if prefix_cache is not None and not failed:
            prefix_cache.keep(model, cache, seq, grid)


def generate_ids(model, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """The generated token ids (without the prompt); keyword arguments as ``decode``."""
    return [token for step in decode(model, prompt_ids, **kwargs) for token in step.tokens]
