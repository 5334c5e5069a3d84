"""arcLM: Qwen3.5-hybrid checkpoints converted to BD3LM block diffusion (docs/arclm.md).

Importing ``optiq_dhara`` registers model_type ``arclm`` with mlx-lm.
"""
