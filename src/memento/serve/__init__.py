"""`memento serve`: an OpenAI-compatible HTTP server over the evicting engine, with continuous
batching behind an asyncio front end (one engine thread), Prometheus metrics and a live KV
dashboard. `create_app(EngineWorker(load), ServerSettings(...))` builds the ASGI app.

The names below load on first use (PEP 562), so `memento --help` does not import torch or FastAPI."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memento.serve.app import ServerSettings, create_app
    from memento.serve.worker import EngineWorker

_WHERE = {
    "ServerSettings": "memento.serve.app",
    "create_app": "memento.serve.app",
    "EngineWorker": "memento.serve.worker",
}
__all__ = ["EngineWorker", "ServerSettings", "create_app"]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'memento.serve' has no attribute {name!r}")
