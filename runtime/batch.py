"""Many prompts decoded together by the engine, each row as it decodes alone."""

from typing import Sequence

from .decode import make_request
from .engine import Engine
from .settings import check_prompt


def generate_batch(
    model, prompts: Sequence[Sequence[int]], *, max_batch: int = 32, **options
) -> list[list[int]]:
    """The generated ids of each prompt, each as ``generate_ids`` gives them alone.

    ``options`` are ``make_request``'s, the same for every prompt (sampled rows
    share the seed: row i draws what its prompt draws alone with it).
    """
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt.")
    settings, sampling = make_request(**options)
    checked = [check_prompt(p, model.args.vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]
    engine = Engine(model, max_batch=max_batch)
    rows = [engine.add(p, settings, sampling) for p in checked]
    outputs: dict[int, list[int]] = {id(r): [] for r in rows}
    while not all(r.done for r in rows):
        for row, step in engine.step():
            outputs[id(row)] += step.tokens
    return [outputs[id(r)] for r in rows]
