"""`memento serve`: an OpenAI-compatible HTTP server over the evicting engine, with continuous
batching behind an asyncio front end (one engine thread), Prometheus metrics and a live KV
dashboard. `create_app(EngineWorker(load), ServerSettings(...))` builds the ASGI app."""

from memento.serve.app import ServerSettings, create_app
from memento.serve.worker import EngineWorker

__all__ = ["EngineWorker", "ServerSettings", "create_app"]
