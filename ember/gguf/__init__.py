"""GGUF, llama.cpp's model file format: models and tokenizers read from it.

`load_gguf(path)` gives a `CausalLM`; `gguf_tokenizer(path)` gives an Ember `Tokenizer` (writable
as `tokenizer.json` + `tokenizer_config.json`). Parsing and dequantization are the `gguf` package's.
"""

from ember.gguf.model import gguf_config, load_gguf
from ember.gguf.reader import GGUFFile, forget_parsed_files, open_gguf
from ember.gguf.tokenizer import gguf_tokenizer

__all__ = ["GGUFFile", "forget_parsed_files", "gguf_config", "gguf_tokenizer", "load_gguf", "open_gguf"]
