"""The training loop shared by LoRA and full training: one compiled step of the joint loss.

Reports both terms of the loss, tokens/s and peak memory; validation and saving
are callbacks, so LoRA and full training differ only in what they train and save.
"""

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from tqdm import tqdm

from .loss import (
    BLOCK_CONTEXT,
    BLOCK_LEN,
    DIFFUSION_WEIGHT,
    joint_loss,
    require_joint,
    sample_noise,
)

Batch = tuple[mx.array, mx.array]  # tokens [B, L], loss mask [B, L]


@dataclass
class TrainConfig:
    iters: int = 1000
    learning_rate: float = 1e-4
    warmup: int = 0
    cosine: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    diffusion_weight: float = DIFFUSION_WEIGHT
    block_len: int = BLOCK_LEN
    block_context: float = BLOCK_CONTEXT  # share of noisy blocks with a block-causal clean context
    steps_per_report: int = 10
    steps_per_eval: int = 100
    seed: int = 0


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    """AdamW, with linear warmup and an optional cosine decay to 10% of the rate."""
    peak = config.learning_rate
    steady = (
        optim.cosine_decay(peak, max(config.iters - config.warmup, 1), peak * 0.1)
        if config.cosine
        else (lambda _: peak)
    )
    rate = steady if config.cosine else peak
    if config.warmup:
        warmup = optim.linear_schedule(0.0, peak, config.warmup)
        rate = optim.join_schedules([warmup, steady], [config.warmup])
    return optim.AdamW(learning_rate=rate, weight_decay=config.weight_decay)


def evaluate_losses(
    model: nn.Module,
    batches: Iterable[Batch],
    diffusion_weight: float = DIFFUSION_WEIGHT,
    block_len: int = BLOCK_LEN,
    seed: int = 0,
    block_context: float = BLOCK_CONTEXT,
) -> dict[str, float]:
    """Token-weighted mean AR and diffusion losses; the noise is seeded, so repeatable.

    The diffusion loss is measured even when training AR-only (weight 0), except
    for a model without a MASK token, which has the AR loss alone.
    """
    diffusion = model.args.mask_token_id is not None
    key = mx.random.key(seed)
    sums = {"ar": 0.0, "diffusion": 0.0, "ar_tokens": 0.0, "diffusion_tokens": 0.0}
    for tokens, mask in batches:
        key, sub = mx.random.split(key)
        padded = tokens.shape[1] + (-tokens.shape[1] % block_len)
        noise = sample_noise(
            (tokens.shape[0], padded), block_len, block_context=block_context, key=sub
        )
        weight = (diffusion_weight or 1.0) if diffusion else 0.0
        losses = joint_loss(model, tokens, mask, weight, block_len, noise, block_context)
        mx.eval(losses)
        sums["ar"] += losses.ar.item() * losses.ar_tokens.item()
        sums["diffusion"] += losses.diffusion.item() * losses.diffusion_tokens.item()
        sums["ar_tokens"] += losses.ar_tokens.item()
        sums["diffusion_tokens"] += losses.diffusion_tokens.item()
    result = {"ar_loss": sums["ar"] / max(sums["ar_tokens"], 1)}
    if diffusion:
        result["diffusion_loss"] = sums["diffusion"] / max(sums["diffusion_tokens"], 1)
    return result


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    config: TrainConfig,
    report: Callable[[dict], None] = print,
    evaluate: Optional[Callable[[int], dict]] = None,
    save: Optional[Callable[[int], None]] = None,
) -> list[dict]:
    """Train the model's trainable parameters on the joint loss; returns every report.

    ``evaluate(step)`` runs at step 0, every ``steps_per_eval`` and at the end; its
    dict joins the report. ``save(step)`` runs after the last step. A diffusion
    weight above 0 for a model without a MASK token is refused before anything runs.
    """
    require_joint(model, config.diffusion_weight)
    mx.random.seed(config.seed)
    optimizer = make_optimizer(config)

    def loss_fn(model, tokens, mask):
        losses = joint_loss(
            model,
            tokens,
            mask,
            config.diffusion_weight,
            config.block_len,
            block_context=config.block_context,
        )
        return losses.total, losses

    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, mask):
        (_, losses), grads = value_and_grad(model, tokens, mask)
        if config.max_grad_norm:
            grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        optimizer.update(model, grads)
        return losses

    history = []

    def log(entry: dict):
        history.append(entry)
        report(entry)

    if evaluate is not None:
        log({"step": 0, **evaluate(0)})
    model.train()
    totals, count, tokens_seen, elapsed = [0.0, 0.0, 0.0], 0, 0, 0.0
    mx.reset_peak_memory()
    for it in tqdm(range(1, config.iters + 1), desc="training", leave=False):
        tokens, mask = next(batches)
        tic = time.perf_counter()
        losses = step(tokens, mask)
        mx.eval(state, losses)
        elapsed += time.perf_counter() - tic
        tokens_seen += tokens.size
        count += 1
        for i, value in enumerate((losses.total, losses.ar, losses.diffusion)):
            totals[i] += value.item()
        last = it == config.iters
        if it % config.steps_per_report == 0 or last:
            log(
                {
                    "step": it,
                    "loss": totals[0] / count,
                    "train_ar_loss": totals[1] / count,
                    "train_diffusion_loss": totals[2] / count,
                    "learning_rate": optimizer.learning_rate.item(),
                    "tokens_per_s": tokens_seen / elapsed,
                    "peak_memory_gb": mx.get_peak_memory() / 1e9,
                }
            )
            totals, count, tokens_seen, elapsed = [0.0, 0.0, 0.0], 0, 0, 0.0
        if evaluate is not None and (it % config.steps_per_eval == 0 or last):
            log({"step": it, **evaluate(it)})
            model.train()
    model.eval()
    if save is not None:
        save(config.iters)
    return history
