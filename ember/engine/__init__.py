"""The inference engine: paged KV cache, continuous batching, prefix caching (see engine.py)."""

from ember.engine.engine import LLM, CompletionOutput, EngineConfig, RequestMetrics, RequestOutput
from ember.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "EngineConfig"]
