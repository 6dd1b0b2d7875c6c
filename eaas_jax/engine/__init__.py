"""Serving: `Engine`, sampling parameters, outputs, continuous batching."""

from eaas_jax.engine.engine import Engine
from eaas_jax.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from eaas_jax.engine.sampling_params import SamplingParams
from eaas_jax.attention_client.remote_backend import ExpertServerError

__all__ = [
    "CompletionOutput", "Engine", "ExpertServerError", "Logprob", "RequestMetrics", "RequestOutput", "SamplingParams",
]
