"""`dhara-mlx serve`."""
