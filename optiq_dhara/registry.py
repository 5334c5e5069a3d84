"""Registration of dhara with mlx-lm.

mlx-lm finds a model's code as the module ``mlx_lm.models.<model_type>`` and a
saved prompt cache's classes by name in ``mlx_lm.models.cache``; registering
puts our model module and cache class at those names. transformers, which mlx-lm
uses for tokenizers, reads config.json too: it gets a config class for dhara, so
loading a tokenizer does not warn about an unknown model type. Any failure raises.
"""

import importlib
import sys

import mlx_lm.models
import mlx_lm.models.cache as mlx_cache
from transformers import AutoConfig, PretrainedConfig

from . import model
from .cache import DharaCache
from .checkpoint import MODEL_TYPE


class DharaConfig(PretrainedConfig):
    """config.json of a dhara checkpoint, as transformers sees it."""

    model_type = MODEL_TYPE


def register() -> None:
    """Make ``mlx_lm.load`` and ``load_prompt_cache`` understand dhara."""
    name = f"mlx_lm.models.{MODEL_TYPE}"
    sys.modules[name] = model
    setattr(mlx_lm.models, MODEL_TYPE, model)
    setattr(mlx_cache, DharaCache.__name__, DharaCache)
    AutoConfig.register(MODEL_TYPE, DharaConfig, exist_ok=True)
    if importlib.import_module(name) is not model:
        raise RuntimeError(f"optiq_dhara could not register {name} with mlx-lm")
    if getattr(mlx_cache, DharaCache.__name__) is not DharaCache:
        raise RuntimeError("optiq_dhara could not register DharaCache with mlx-lm")
