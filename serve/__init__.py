"""Serving dhara: an OpenAI-compatible HTTP server and the terminal chat session.

``Engine`` runs every request on one MLX worker thread; ``create_app`` puts the
OpenAI API (Starlette) in front of it; ``run_server`` is ``dhara-mlx serve``.
"""

from .app import ServerConfig, background_server, create_app, run_server
from .engine import Engine

__all__ = ["Engine", "ServerConfig", "background_server", "create_app", "run_server"]
