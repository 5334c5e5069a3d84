"""`dhara-mlx generate`."""
