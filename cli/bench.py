"""`dhara-mlx bench`."""
