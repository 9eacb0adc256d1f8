"""Ember: a complete large-language-model system you can read.

The Python API most callers need:
    model = ember.load_model("runs/quickstart/model")
    tok = ember.load_tokenizer("runs/quickstart/model")
    print(ember.generate(model, tok, "def fib(n):", ember.SamplingParams(max_tokens=64, temperature=0)))
    ember.save_pretrained(model, tok, "copy")
    outs = ember.LLM("runs/quickstart/model").generate(["def "], ember.SamplingParams(max_tokens=32))
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Names resolve on first use, so `ember --help` does not wait for torch to import.
_EXPORTS = {
    "load_model": "ember.load", "save_pretrained": "ember.checkpoint",
    "ModelConfig": "ember.config", "preset": "ember.config", "EmberError": "ember.errors",
    "generate": "ember.generation", "CausalLM": "ember.model", "Tokenizer": "ember.tokenizer",
    "load_tokenizer": "ember.load", "LLM": "ember.engine", "SamplingParams": "ember.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
