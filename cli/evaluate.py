"""`dhara-mlx evaluate`."""
