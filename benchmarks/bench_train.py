"""LoRA with the joint loss vs next-token-only LoRA, on the trained fixture.

The task: given a record class's ``__init__`` (as the fixture's corpus writes
them), write a method the corpus never has (``--task hash``: its ``__hash__``;
``--task defaults``: a classmethod with random default values); ChatML
prompt/completion records (prompt masked), generated at run time from the
corpus generator's names, the test split with another seed. The same steps,
rank and rate train one adapter per objective; then, for the base model and
both adapters, on the task's test split: AR loss, diffusion loss (seeded noise),
block-diffusion tokens per forward (threshold 0.5) and self-spec accepted draft
tokens per round (k = 8) after the test prompts; and each run's training
tokens/s and peak memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/bench_train.py
"""

import json
import random
import sys
import tempfile
from pathlib import Path

import mlx_lm
import typer

from optiq_dhara.train.data import dataset_batches, load_jsonl_splits
from optiq_dhara.train.lora import LoraConfig, run_lora
from optiq_dhara.train.modes import diffusion_tokens_per_forward, spec_accepted_per_round
from optiq_dhara.train.trainer import evaluate_losses

FIXTURES = Path(__file__).parents[1] / "tests" / "fixtures"
FIXTURE = FIXTURES / "dhara_tiny_trained"
sys.path.insert(0, str(FIXTURES))  # the fixture's corpus generator: its names
from synthetic_code import DEFAULTS, stdlib_names  # noqa: E402


def class_task(limit: int, task: str) -> dict[str, list[dict]]:
    """{split: [{"prompt", "completion"}]}: a class and its ``__init__`` -> a new method.

    ``hash``: its ``__hash__``, fully determined by the prompt. ``defaults``: a
    ``defaults()`` classmethod calling the class with a default drawn at random
    for each field, so the completion keeps about 2 nats of entropy per field
    that no model can remove (as real tasks have), and AR losses stay comparable.
    """
    arguments, classes = stdlib_names()
    splits = {}
    for seed, name in enumerate(("train", "valid", "test")):
        rng = random.Random(100 + seed)
        records = []
        for _ in range(limit):
            params = rng.sample(arguments, rng.randint(1, 3))
            body = "\n".join(f"        self.{p} = {p}" for p in params)
            prompt = f"class {rng.choice(classes)}:\n\n    def __init__(self, {', '.join(params)}):\n{body}"
            if task == "hash":
                fields = ", ".join(f"self.{p}" for p in params)
                completion = f"    def __hash__(self):\n        return hash(({fields},))"
            else:
                values = ", ".join(f"{p}={rng.choice(DEFAULTS)}" for p in params)
                completion = (
                    f"    @classmethod\n    def defaults(cls):\n        return cls({values})"
                )
            records.append({"prompt": prompt, "completion": completion})
        splits[name] = records
    return splits


def write_task(folder: Path, task: dict[str, list[dict]]) -> None:
    for name, records in task.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def measure(
    model, tokenizer, data: Path, config: LoraConfig, prompts: int, new_tokens: int
) -> dict:
    test = load_jsonl_splits(data, tokenizer, mask_prompt=True)["test"]
    batches = dataset_batches(test, config.batch_size, model.args.mask_token_id, seed=1)
    losses = evaluate_losses(model, batches, 1.0, config.block_len, seed=1)
    starts = [list(test[i][0][: test[i][1]]) for i in range(min(prompts, len(test)))]
    return {
        **losses,
        "diffusion_tpf_0.5": diffusion_tokens_per_forward(model, starts, new_tokens, 0.5),
        "spec_accepted_k8": spec_accepted_per_round(model, starts, new_tokens, k=8),
    }


def main(
    model: Path = FIXTURE,
    iters: int = 200,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    rank: int = 8,
    examples: int = 400,
    prompts: int = 24,
    new_tokens: int = 48,
    task: str = typer.Option(
        "defaults", help="defaults (random values) or hash (determined by the prompt)."
    ),
    out: Path = typer.Option(None, help="Also write the results as JSON here."),
) -> None:
    if task not in ("defaults", "hash"):
        raise typer.BadParameter(f"task {task!r} is not defaults or hash", param_hint="--task")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "task"
        data.mkdir()
        write_task(data, class_task(examples, task))
        base, tokenizer = mlx_lm.load(str(model))
        common = dict(
            iters=iters,
            batch_size=batch_size,
            learning_rate=learning_rate,
            rank=rank,
            num_layers=-1,
            mask_prompt=True,
            steps_per_report=max(iters // 4, 1),
            steps_per_eval=iters,
            val_batches=4,
            spec_prompts=0,
        )
        results["base"] = measure(base, tokenizer, data, LoraConfig(**common), prompts, new_tokens)
        for objective in ("joint", "ar"):
            config = LoraConfig(objective=objective, **common)
            trained, history = run_lora(
                model, data, Path(scratch) / objective, config, report=lambda e: None
            )
            reports = [e for e in history if "tokens_per_s" in e]
            results[objective] = {
                **measure(trained, tokenizer, data, config, prompts, new_tokens),
                "train_tokens_per_s": sum(e["tokens_per_s"] for e in reports) / len(reports),
                "peak_memory_gb": max(e["peak_memory_gb"] for e in reports),
            }
    print(
        "| model | task AR loss | task diffusion loss | diffusion tokens/forward (0.5) "
        "| self-spec accepted/round (k=8) | train tokens/s | peak memory GB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        speed = f"{r['train_tokens_per_s']:.0f}" if "train_tokens_per_s" in r else "-"
        memory = f"{r['peak_memory_gb']:.2f}" if "peak_memory_gb" in r else "-"
        print(
            f"| {name} | {r['ar_loss']:.3f} | {r['diffusion_loss']:.3f} | {r['diffusion_tpf_0.5']:.2f} "
            f"| {r['spec_accepted_k8']:.2f} | {speed} | {memory} |"
        )
    base, joint, ar = results["base"], results["joint"], results["ar"]
    print(
        f"joint / base: diffusion tokens/forward {joint['diffusion_tpf_0.5'] / base['diffusion_tpf_0.5']:.3f}, "
        f"self-spec accepted {joint['spec_accepted_k8'] / max(base['spec_accepted_k8'], 1e-9):.3f}; "
        f"AR loss joint / ar-only {joint['ar_loss'] / ar['ar_loss']:.3f}"
    )
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
