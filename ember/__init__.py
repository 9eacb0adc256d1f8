"""Ember: a complete large-language-model system you can read.

The Python API most callers need:
    model = ember.load_model("runs/quickstart/model")
    tok = ember.load_tokenizer("runs/quickstart/model")
    print(ember.generate(model, tok, "def fib(n):", max_new_tokens=64, temperature=0))
    ember.save_pretrained(model, tok, "copy")
"""

from ember.checkpoint import load_model, save_pretrained
from ember.config import ModelConfig, preset
from ember.errors import EmberError
from ember.generate import generate
from ember.model import CausalLM
from ember.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CausalLM", "EmberError", "ModelConfig", "Tokenizer", "generate", "load_model", "load_tokenizer",
           "preset", "save_pretrained"]
__version__ = "0.1.0"
