"""`eaas-jax serve`: the OpenAI-compatible HTTP server (`app.build_app`) over
an engine driven by one thread (`async_engine.AsyncEngine`)."""

from eaas_jax.serve.app import build_app
from eaas_jax.serve.async_engine import AsyncEngine, EngineStopped, ServerBusy

__all__ = ["AsyncEngine", "EngineStopped", "ServerBusy", "build_app"]
