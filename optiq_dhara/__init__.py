"""optiq-dhara: the dhara language models on MLX.

Importing the package registers model_type ``dhara_ar`` with mlx-lm, so
``mlx_lm.load(path)`` opens dhara checkpoints.
"""

from .registry import register

register()

__version__ = "0.1.0"
