"""LoRA (and QLoRA) fine-tuning of dhara with the joint loss, and fusing adapters.

The adapters are mlx-lm's: ``LoRALinear`` layers made by
``linear_to_lora_layers``, saved as ``adapters.safetensors`` plus
``adapter_config.json``, so ``mlx_lm.load(model, adapter_path=...)`` applies them.
On a quantized model the frozen base keeps its per-layer bits (QLoRA); fusing
re-quantizes each layer with its own bits and group size.
"""

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

from optiq_dhara.checkpoint import load

from .checkpoint import atomic_write, check_output, save_model_atomic, with_objective
from .data import dataset_batches, load_jsonl_splits
from .loss import BLOCK_CONTEXT, BLOCK_LEN, DIFFUSION_WEIGHT, require_joint
from .modes import spec_accepted_per_round
from .trainer import TrainConfig, evaluate_losses, train

OBJECTIVES = ("joint", "ar")


@dataclass
class LoraConfig:
    objective: str = "joint"
    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: Optional[int] = None  # the last N layers; -1 for all; None: min(16, layers)
    iters: int = 1000
    batch_size: int = 4
    learning_rate: float = 1e-5
    max_seq_length: int = 2048
    mask_prompt: bool = False
    diffusion_weight: float = DIFFUSION_WEIGHT
    block_len: int = BLOCK_LEN
    block_context: float = BLOCK_CONTEXT
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    spec_prompts: int = 4  # validation prompts for self-spec acceptance; 0 skips it
    spec_tokens: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}."
            )
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}.")
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("iters and batch_size must be >= 1.")

    @property
    def weight(self) -> float:
        """The diffusion weight the objective trains with."""
        return self.diffusion_weight if self.objective == "joint" else 0.0


DEFAULT_LAYERS = 16


def resolve_layers(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with ``num_layers`` set: None becomes min(16, the model's layers)."""
    if config.num_layers is not None:
        return config
    return replace(config, num_layers=min(DEFAULT_LAYERS, len(model.layers)))


def add_lora(model: nn.Module, config: LoraConfig) -> None:
    """Freeze the model and put LoRA on the linear layers of its last ``num_layers`` layers
    (None: the last 16, or all of a smaller model)."""
    config = resolve_layers(model, config)
    if config.num_layers > len(model.layers):
        raise ValueError(
            f"num_layers {config.num_layers} > the model's {len(model.layers)} layers; "
            "use at most that, or -1 for all."
        )
    model.freeze()
    parameters = {"rank": config.rank, "scale": config.scale, "dropout": config.dropout}
    linear_to_lora_layers(model, config.num_layers, parameters)


def adapter_config(config: LoraConfig, model_path: Path) -> dict:
    """What ``mlx_lm.load(adapter_path=...)`` reads, plus how the adapter was trained."""
    return {
        "fine_tune_type": "lora",
        "model": str(model_path),
        "num_layers": config.num_layers,
        "lora_parameters": {"rank": config.rank, "scale": config.scale, "dropout": config.dropout},
        "training": asdict(config),
    }


def save_adapters(model: nn.Module, adapter_path: Path, settings: dict) -> None:
    adapter_path = Path(adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_write(
        adapter_path / "adapters.safetensors",
        lambda temp: mx.save_safetensors(str(temp), weights),
    )
    atomic_write(
        adapter_path / "adapter_config.json",
        lambda temp: temp.write_text(json.dumps(settings, indent=2) + "\n"),
    )


def validation_prompts(dataset, count: int, limit: int = 64) -> list[list[int]]:
    """The prompt of the first ``count`` records (their first half when unmasked)."""
    prompts = []
    for index in range(min(count, len(dataset))):
        tokens, offset = dataset[index]
        cut = offset if offset > 0 else max(len(tokens) // 2, 1)
        prompts.append(list(tokens[:cut][-limit:]))
    return prompts


def pad_id(model: nn.Module) -> int:
    """The id batches are padded with (never trained on): MASK, or 0 without one."""
    mask_id = model.args.mask_token_id
    return 0 if mask_id is None else mask_id


def make_validation(model: nn.Module, dataset, config: LoraConfig) -> Callable[[int], dict]:
    """Held-out AR and diffusion losses, and self-spec (k = 8) accepted tokens per round
    (AR alone for a model without a MASK token)."""
    spec = "spec" in model.args.modes
    prompts = validation_prompts(dataset, config.spec_prompts) if spec else []

    def evaluate(step: int) -> dict:
        model.eval()
        batches = dataset_batches(
            dataset, config.batch_size, pad_id(model), config.max_seq_length, seed=config.seed
        )
        batches = (batch for _, batch in zip(range(config.val_batches), batches))
        losses = evaluate_losses(
            model,
            batches,
            config.diffusion_weight,
            config.block_len,
            config.seed,
            config.block_context,
        )
        result = {f"val_{name}": value for name, value in losses.items()}
        if prompts:
            result["val_spec_accepted_k8"] = spec_accepted_per_round(
                model, prompts, config.spec_tokens, k=8, block_len=config.block_len
            )
        return result

    return evaluate


def run_lora(
    model_path: Path,
    data_dir: Path,
    adapter_path: Path,
    config: LoraConfig,
    report: Callable[[dict], None] = print,
) -> tuple[nn.Module, list[dict]]:
    """``dhara-mlx lora``: load, add LoRA, train on ``data_dir``, save the adapters.

    Returns the trained model (with its LoRA layers) and every report.
    """
    config.validate()
    model, tokenizer = load(model_path)
    config = resolve_layers(model, config)
    require_joint(model, config.weight)  # the joint objective needs MASK: refused before work
    splits = load_jsonl_splits(Path(data_dir), tokenizer, config.mask_prompt)
    for name, split in splits.items():
        if name != "test" and len(split) < config.batch_size:
            raise ValueError(
                f"{Path(data_dir) / name}.jsonl has {len(split)} records, fewer than "
                f"--batch-size {config.batch_size}."
            )
    mx.random.seed(config.seed)  # the LoRA A matrices start random
    add_lora(model, config)
    settings = adapter_config(config, model_path)
    batches = dataset_batches(
        splits["train"],
        config.batch_size,
        pad_id(model),
        config.max_seq_length,
        loop=True,
        seed=config.seed,
    )
    evaluate = make_validation(model, splits["valid"], config) if "valid" in splits else None
    train_config = TrainConfig(
        iters=config.iters,
        learning_rate=config.learning_rate,
        diffusion_weight=config.weight,
        block_len=config.block_len,
        block_context=config.block_context,
        steps_per_report=config.steps_per_report,
        steps_per_eval=config.steps_per_eval,
        seed=config.seed,
    )
    history = train(
        model,
        batches,
        train_config,
        report,
        evaluate,
        save=lambda step: save_adapters(model, adapter_path, settings),
    )
    return model, history


def fuse(
    model_path: Path,
    adapter_path: Path,
    out_dir: Path,
    dequantize: bool = False,
    force: bool = False,
) -> None:
    """Fold the adapters into the weights; quantized layers keep their bits and group size.

    ``out_dir`` is written atomically; it may not be (or be inside) the base model
    or the adapters, and an existing one is replaced only with ``force``.
    """
    replace_out = check_output(
        out_dir,
        force,
        option="--save-path",
        checkpoints=[("the base model's folder", model_path), ("the adapters", adapter_path)],
    )
    model, tokenizer, config = load(model_path, adapter_path=str(adapter_path), return_config=True)
    settings = json.loads((Path(adapter_path) / "adapter_config.json").read_text())
    training = settings.get("training", {})
    if training.get("objective") == "joint":  # jointly trained adapters: the fused model is joint
        config = with_objective(config, training.get("diffusion_weight", DIFFUSION_WEIGHT))
    fused = [
        (name, module.fuse(dequantize=dequantize))
        for name, module in model.named_modules()
        if hasattr(module, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    mx.eval(model.parameters())
    save_model_atomic(model, config, Path(out_dir), Path(model_path), replace_out)
