"""`dhara-mlx eval` on the local multiple-choice task: AR vs diffusion accuracy, items/s.

Runs lm-eval on the task (offline) in both scoring modes at each batch size, the
runs of one repeat interleaved so that machine noise hits all alike; reports the
accuracy (the same at every batch size: batching does not change scores) and the
best items/s over the repeats, whole lm-eval run included.

    python benchmarks/bench_eval.py --model tests/fixtures/dhara_tiny_trained
"""

import os
import time
from pathlib import Path
from typing import Annotated

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import mlx_lm  # noqa: E402
import typer  # noqa: E402

from optiq_dhara.evaluate.harness import DharaLM, run_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = ROOT / "tests" / "fixtures" / "eval_task"
TRAINED = ROOT / "tests" / "fixtures" / "dhara_tiny_trained"
GOLDEN = ROOT / "tests" / "fixtures" / "golden_tiny"


def one_run(model, tokenizer, task: str, mode: str, batch_size: int, block_len: int):
    """(acc, acc_norm, items, seconds) of one lm-eval run."""
    lm = DharaLM(model, tokenizer, mode=mode, batch_size=batch_size, block_len=block_len)
    start = time.perf_counter()
    results = run_tasks(lm, [task], include_path=[TASK_DIR])
    seconds = time.perf_counter() - start
    metrics = results["results"][task]
    items = results["n-samples"][task]["effective"]
    return metrics["acc,none"], metrics["acc_norm,none"], items, seconds


def main(
    model: Annotated[Path, typer.Option(help="Checkpoint (default: the trained fixture).")] = (
        TRAINED if TRAINED.exists() else GOLDEN
    ),
    task: Annotated[
        str, typer.Option(help="Task under tests/fixtures/eval_task.")
    ] = "dhara_mc_local",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    block_len: Annotated[int, typer.Option(help="Diffusion block length.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Interleaved repeats; best is kept.")] = 3,
) -> None:
    loaded, tokenizer = mlx_lm.load(str(model))
    sizes = [int(b) for b in batch_sizes.split(",")]
    best: dict[tuple[str, int], tuple] = {}
    for _ in range(repeats):
        for mode in ("ar", "diffusion"):
            for size in sizes:
                run = one_run(loaded, tokenizer, task, mode, size, block_len)
                if (mode, size) not in best or run[3] < best[mode, size][3]:
                    best[mode, size] = run
    typer.echo(f"model {model}, task {task}, block_len {block_len}, best of {repeats}")
    typer.echo("| mode | batch | acc | acc_norm | items | seconds | items/s | vs batch 1 |")
    typer.echo("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (mode, size), (acc, acc_norm, items, seconds) in best.items():
        speedup = best[mode, sizes[0]][3] / seconds
        typer.echo(
            f"| {mode} | {size} | {acc:.3f} | {acc_norm:.3f} | {items} | {seconds:.2f} | "
            f"{items / seconds:.1f} | {speedup:.2f}x |"
        )


if __name__ == "__main__":
    typer.run(main)
