"""`ember.load.load_model`: checkpoint -> adapter -> quantization, each step the same as doing it by hand."""

import copy

import pytest
import torch

from ember.checkpoint import load_pretrained, save_pretrained
from ember.config import preset
from ember.data import stdlib_files
from ember.errors import EmberError
from ember.load import load_model
from ember.lora import LoraConfig, apply_lora, load_adapter, lora_layers, merge_and_unload, save_adapter
from ember.model import CausalLM
from ember.quant import quantize_model
from ember.quant.calibration import stdlib_calibration
from ember.quant.io import save_quantized
from ember.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model with its own tokenizer (SmoothQuant's default calibration encodes text with it)."""
    files = stdlib_files(max_bytes=200_000)
    tok = train_tokenizer((f.read_text(errors="replace") for f in files), vocab_size=300)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("load") / "base"
    save_pretrained(CausalLM(preset("tiny", vocab_size=tok.vocab_size, intermediate_size=128)), tok, path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(base_dir):
    model = apply_lora(load_pretrained(base_dir), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():  # B starts at zero: move it, or merging would change nothing
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05
    return save_adapter(model, base_dir.parent / "adapter", base_model=str(base_dir))


def ids(vocab, seed=3):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_plain_load_is_the_checkpoint_in_the_requested_dtype(base_dir):
    model = load_model(base_dir, device="cpu", dtype="float32")
    x = ids(model.config.vocab_size)
    assert torch.equal(model(x), load_pretrained(base_dir)(x)) and not model.training
    half = load_model(base_dir, device="cpu", dtype="bfloat16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


@torch.no_grad()
def test_adapter_then_quantization_is_merging_then_quantizing_by_hand(base_dir, adapter_dir):
    by_hand = quantize_model(merge_and_unload(load_adapter(load_pretrained(base_dir), adapter_dir)), "int8")
    loaded = load_model(base_dir, device="cpu", dtype="float32", adapter=adapter_dir, quantization="int8")
    x = ids(loaded.config.vocab_size)
    assert torch.equal(loaded(x), by_hand(x))
    assert not lora_layers(loaded) and loaded.quantization_config["method"] == "int8"
    # the adapter did change the model: without it the quantized logits differ
    plain = load_model(base_dir, device="cpu", dtype="float32", quantization="int8")
    assert not torch.equal(plain(x), loaded(x))


@torch.no_grad()
def test_smoothquant_calibrates_on_the_sample_passed_in_and_on_the_stdlib_without_one(base_dir):
    base, tok = load_pretrained(base_dir), load_tokenizer(base_dir)
    x = ids(base.config.vocab_size)
    sample = ids(base.config.vocab_size, seed=7)
    texts = ["def parse(line):\n    return line.split(',')\n", "class Queue:\n    def put(self, item): ..."]
    expected = {
        "ids": quantize_model(copy.deepcopy(base), "smoothquant", calibration=sample)(x),
        "texts": quantize_model(copy.deepcopy(base), "smoothquant", calibration=texts, tokenizer=tok)(x),
        "stdlib": quantize_model(copy.deepcopy(base), "smoothquant", calibration=stdlib_calibration(tok))(x),
    }
    # Three samples, three smoothings: otherwise the equalities below could not tell which sample was used.
    assert not torch.equal(expected["ids"], expected["stdlib"]) and not torch.equal(expected["texts"], expected["stdlib"])
    load = lambda calibration: load_model(base_dir, device="cpu", dtype="float32", quantization="smoothquant",  # noqa: E731
                                          calibration=calibration)(x)
    assert torch.equal(load(sample), expected["ids"])
    assert torch.equal(load(texts), expected["texts"])
    assert torch.equal(load(None), expected["stdlib"])


def test_a_saved_quantized_directory_loads_quantized_and_refuses_an_adapter(base_dir, adapter_dir, tmp_path):
    q = quantize_model(load_pretrained(base_dir), "int8")
    save_quantized(q, None, tmp_path / "q")
    x = ids(q.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "q", device="cpu")(x), q(x))
    with pytest.raises(EmberError, match="saved quantized; an adapter merges into full-precision weights"):
        load_model(tmp_path / "q", device="cpu", adapter=adapter_dir)
    with pytest.raises(EmberError, match="already quantized with int8"):
        load_model(tmp_path / "q", device="cpu", quantization="int4")
    with pytest.raises(EmberError, match="holds quantized weights; load it with ember.load_model"):
        load_pretrained(tmp_path / "q")


def test_bad_requests_fail_with_one_sentence(base_dir, tmp_path):
    with pytest.raises(EmberError, match="Unknown quantization method 'int3'"):
        load_model(base_dir, device="cpu", quantization="int3")
    with pytest.raises(EmberError, match="calibration= is SmoothQuant's sample"):
        load_model(base_dir, device="cpu", quantization="int8", calibration=[[1, 2, 3]])
    with pytest.raises(EmberError, match="does not exist"):
        load_model(tmp_path / "missing", device="cpu")
    with pytest.raises(EmberError, match="Adapter directory .* does not exist"):
        load_model(base_dir, device="cpu", adapter=tmp_path / "no-adapter")
