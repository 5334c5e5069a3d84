"""Serving dhara: an OpenAI-compatible HTTP server and the terminal chat session.

``Worker`` decodes the requests in one continuous batch on one MLX thread;
``create_app`` puts the OpenAI API (Starlette) in front of it; ``run_server`` is
``dhara-mlx serve``.
"""

from .app import ServerConfig, background_server, create_app, run_server
from .engine import QueueFull, Worker

__all__ = ["QueueFull", "ServerConfig", "Worker", "background_server", "create_app", "run_server"]
