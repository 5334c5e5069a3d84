"""Registration of dhara with mlx-lm.

mlx-lm finds a model's code as the module ``mlx_lm.models.<model_type>`` and a
saved prompt cache's classes by name in ``mlx_lm.models.cache``; registering
puts our model module and cache class at those names. transformers, which mlx-lm
uses for tokenizers, reads config.json too: it gets a config class for dhara, so
loading a tokenizer does not warn about an unknown model type. Any failure raises.
"""

import importlib
import sys
from typing import Optional

import mlx_lm.models
import mlx_lm.models.cache as mlx_cache
from transformers import AutoConfig, PretrainedConfig

from . import model
from .arclm import model as arclm_model
from .cache import DharaCache
from .checkpoint import MODEL_TYPE

ARCLM_TYPE = "arclm"


class DharaConfig(PretrainedConfig):
    """config.json of a dhara checkpoint, as transformers sees it.

    transformers standardizes ``rope_scaling`` (YaRN) when it reads a config and
    then needs ``max_position_embeddings`` (and ``rope_theta``): declared here so
    that loading the tokenizer of a YaRN checkpoint works.
    """

    model_type = MODEL_TYPE
    max_position_embeddings: Optional[int] = None
    rope_theta: float = 8_000_000.0


class ArcLMConfig(PretrainedConfig):
    """config.json of an arcLM checkpoint (a Qwen3.5 text config), as transformers sees it."""

    model_type = ARCLM_TYPE


def register() -> None:
    """Make ``mlx_lm.load`` and ``load_prompt_cache`` understand dhara (and arcLM)."""
    for model_type, module, config in (
        (MODEL_TYPE, model, DharaConfig),
        (ARCLM_TYPE, arclm_model, ArcLMConfig),
    ):
        name = f"mlx_lm.models.{model_type}"
        sys.modules[name] = module
        setattr(mlx_lm.models, model_type, module)
        AutoConfig.register(model_type, config, exist_ok=True)
        if importlib.import_module(name) is not module:
            raise RuntimeError(f"optiq_dhara could not register {name} with mlx-lm")
    setattr(mlx_cache, DharaCache.__name__, DharaCache)
    if getattr(mlx_cache, DharaCache.__name__) is not DharaCache:
        raise RuntimeError("optiq_dhara could not register DharaCache with mlx-lm")
