"""lm-evaluation-harness adapter: dhara scored in AR or block-diffusion mode.

Needs the ``eval`` extra (lm-eval 0.4.11). Importing this module registers the
model name ``dhara-mlx``, so ``lm_eval.simple_evaluate(model="dhara-mlx",
model_args="pretrained=PATH,mode=diffusion")`` works as well as passing a
``DharaLM`` object.
"""

from typing import Optional, Sequence

import mlx_lm
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from tqdm import tqdm

from optiq_dhara.runtime import decode

from .scoring import MODES, loglikelihoods

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


class UnknownTaskError(ValueError):
    """A requested task is neither in lm-eval's catalogue nor under the include path."""


@register_model("dhara-mlx")
class DharaLM(TemplateLM):
    """A loaded dhara model and tokenizer, scored in ``mode`` ("ar" or "diffusion")."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        mode: str = "ar",
        batch_size: int = 1,
        block_len: int = 32,
        threshold: float = 0.5,
        max_length: Optional[int] = None,
        name: str = "dhara",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
        if mode == "diffusion":  # refused before any task is built
            model.args.require_mask("diffusion scoring (eval --mode diffusion)")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode
        self.batch_size = int(batch_size)
        self.block_len = int(block_len)
        self.threshold = float(threshold)
        self.max_length = int(
            max_length or getattr(model.args, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        )
        self.name = name

    @classmethod
    def load(cls, path: str, **options) -> "DharaLM":
        """Open a checkpoint folder (or hub repo) with its tokenizer."""
        model, tokenizer = mlx_lm.load(str(path))
        return cls(model, tokenizer, name=str(path), **options)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """lm-eval's ``--model_args``: ``pretrained=PATH,mode=diffusion,block_len=32``."""
        args = simple_parse_args_string(arg_string)
        if "pretrained" not in args:
            raise ValueError("model_args needs pretrained=PATH (the dhara checkpoint folder).")
        batch_size = (additional_config or {}).get("batch_size")
        if batch_size is not None:
            args.setdefault("batch_size", batch_size)
        return cls.load(args.pop("pretrained"), **args)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS when the tokenizer has one, else EOS (as lm-eval's HF model does)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, **kwargs
    ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def get_model_info(self) -> dict:
        """Recorded in the results file's ``config``."""
        return {
            "model": self.name,
            "mode": self.mode,
            "block_len": self.block_len,
            "max_length": self.max_length,
        }

    def score(self, pairs: Sequence[tuple[list[int], list[int]]], progress: bool = True):
        """(log-probability, is_greedy) of token pairs, in this model's mode."""
        return loglikelihoods(
            self.model,
            pairs,
            mode=self.mode,
            batch_size=self.batch_size,
            block_len=self.block_len,
            max_length=self.max_length,
            progress=progress,
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = self.score(pairs, progress=not disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood over disjoint windows of ``max_length`` tokens."""
        pairs, owners = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self.score(pairs, progress=not disable_tqdm)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context in this model's mode until a stop string or ``max_gen_toks``."""
        outputs = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm):
            context, gen_kwargs = request.args
            outputs.append(self._generate_one(context, dict(gen_kwargs)))
            self.cache_hook.add_partial("generate_until", request.args, outputs[-1])
        return outputs

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        sampling = {key: gen_kwargs[key] for key in SAMPLING_KEYS if key in gen_kwargs}
        if gen_kwargs.get("do_sample", False):
            sampling.setdefault("temperature", 1.0)
        else:
            sampling["temperature"] = 0.0
        prompt = self.tok_encode(context)[-max(1, self.max_length - max_tokens) :]
        prompt = prompt or [self.prefix_token_id]
        steps = decode(
            self.model,
            prompt,
            mode=self.mode,
            max_tokens=max_tokens,
            stop_ids=[self.eot_token_id],
            block_len=self.block_len,
            threshold=self.threshold,
            **sampling,
        )
        ids: list[int] = []
        text = ""
        for step in steps:
            ids += [t for t in step.tokens if t != self.eot_token_id]
            text = self.tokenizer.decode(ids)
            if any(stop and stop in text for stop in until):
                steps.close()
                break
        return cut_at_stop(text, until)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def task_manager(tasks: Sequence[str], include_path: Optional[Sequence[str]]) -> TaskManager:
    """lm-eval's task index, with the YAML tasks found under ``include_path``.

    When every requested task is a plain task of ``include_path``, lm-eval's own
    catalogue (seconds to index) is left out.
    """
    paths = [str(p) for p in include_path or ()]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(local.task_index.get(t, {}).get("type") == "task" for t in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or under {', '.join(paths)}" if paths else ""
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: not in lm-eval's task list{where}. "
            "Give --include-path DIR for a folder of local task YAML files."
        )
    return manager


def run_tasks(
    lm: DharaLM,
    tasks: Sequence[str],
    *,
    num_shots: Optional[int] = None,
    limit: Optional[float] = None,
    include_path: Optional[Sequence[str]] = None,
    seed: int = 1234,
) -> dict:
    """lm-eval's results for ``tasks`` (names of lm-eval tasks or local YAML tasks)."""
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_shots,
        limit=limit,
        batch_size=lm.batch_size,
        task_manager=task_manager(tasks, include_path),
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
