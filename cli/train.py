"""`dhara-mlx train`."""
