"""`dhara-mlx convert`."""
