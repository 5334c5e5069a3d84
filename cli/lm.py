"""`dhara-mlx lm`."""
