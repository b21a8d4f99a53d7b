import struct

import pytest
import torch

from arithlens import paths
from arithlens.core import models
from arithlens.core.models import load_model, logits_at_end
from arithlens.core.registry import ModelSpecError
from arithlens.core.specs import resolve_spec


def test_registry_and_forms(tmp_path):
    assert resolve_spec("tiny").kind == "tiny"
    assert resolve_spec("tiny:3").source == "llama:3"
    assert resolve_spec("tiny-llama").kind == "tiny"
    assert resolve_spec("org/some-model").kind == "hub"
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_spec(str(tmp_path / "hf")).kind == "local"


@pytest.mark.parametrize("spec, message", [
    ("no such model", "unknown model spec 'no such model': expected a registry name"),
    ("/nonexistent/x.gguf", "GGUF file not found"),
])
def test_bad_specs_fail_in_one_line(spec, message):
    with pytest.raises(ModelSpecError, match=message) as err:
        resolve_spec(spec)
    assert "\n" not in str(err.value)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelSpecError, match="bad magic"):
        resolve_spec(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 20)
    with pytest.raises(ModelSpecError, match="GGUF header of .* is truncated"):
        load_model(str(truncated))
    # a readable header (architecture llama) but no tensors: transformers itself fails, still one line
    empty = tmp_path / "empty.gguf"
    key, arch = b"general.architecture", b"llama"
    empty.write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + struct.pack("<IQ", 8, len(arch)) + arch)
    with pytest.raises(ModelSpecError, match="could not read GGUF file") as err:
        load_model(str(empty))
    assert "\n" not in str(err.value)


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_tiny_bridge_matches_hf_and_loads_once(tiny):
    assert load_model("tiny") is tiny
    assert tiny.device.type in ("cpu", "cuda") and tiny.dtype == (torch.float32 if tiny.device.type == "cpu" else torch.bfloat16)
    tokens = torch.tensor([tiny.tokenizer("3 + 4 = ")["input_ids"]])
    with torch.no_grad():
        hf = tiny.bridge.original_model(tokens.to(tiny.device)).logits[:, -1].float()
    torch.testing.assert_close(logits_at_end(tiny, tokens), hf)
    assert tiny.n_layers == 2 and tiny.n_heads == 4
    assert {"layers", "heads per layer", "KV heads"} <= set(models.describe_model(tiny))


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.build_tiny_hf_model(5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = models.build_tiny_hf_model(5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_local_directory_spec(tiny, tmp_path):
    hf = models.build_tiny_hf_model(0, vocab_size=len(tiny.tokenizer))  # the Bridge rewraps its own copy
    hf.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    local = load_model(str(tmp_path / "m"))
    assert local.spec.kind == "local"
    tokens = torch.tensor([tiny.tokenizer("5 * 1 = ")["input_ids"]])
    torch.testing.assert_close(logits_at_end(local, tokens), logits_at_end(tiny, tokens))


@pytest.mark.real_model
def test_smollm2_bridge_matches_hf(smollm2):
    assert (smollm2.n_layers, smollm2.n_heads, int(smollm2.cfg.n_key_value_heads)) == (30, 9, 3)
    tokens = torch.tensor([smollm2.tokenizer("2 + 3 = 5\n1 + 4 = 5\n3 + 3 = 6\n4 + 3 = ")["input_ids"]])
    with torch.no_grad():
        hf = smollm2.bridge.original_model(tokens).logits[:, -1].float()
    bridge = logits_at_end(smollm2, tokens)
    torch.testing.assert_close(bridge, hf, rtol=1e-4, atol=1e-4)
    assert smollm2.tokenizer.decode([int(bridge.argmax())]) == "7"
    cached = list((paths.cache_dir() / "models").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert cached, "dequantized weights were not cached"


@pytest.mark.qwen
@pytest.mark.real_model
@pytest.mark.parametrize("fixture, shape", [("qwen05", (24, 14, 2, 896)), ("qwen15", (28, 12, 2, 1536))])
def test_qwen_bridge_matches_hf(request, fixture, shape):
    model = request.getfixturevalue(fixture)  # skips unless `arithlens models fetch` installed it
    cfg = model.cfg
    assert type(model.bridge.original_model).__name__ == "Qwen2ForCausalLM"
    assert (model.n_layers, model.n_heads, int(cfg.n_key_value_heads), int(cfg.d_model)) == shape
    assert int(cfg.d_vocab) == 151_936
    assert all(len(model.tokenizer(str(d), add_special_tokens=False)["input_ids"]) == 1 for d in range(10))
    tokens = torch.tensor([model.tokenizer("2 + 3 = 5\n1 + 4 = 5\n3 + 3 = 6\n4 + 3 = ")["input_ids"]])
    with torch.no_grad():
        hf = model.bridge.original_model(tokens).logits[:, -1].float()
    bridge = logits_at_end(model, tokens)
    torch.testing.assert_close(bridge, hf, rtol=1e-5, atol=1e-5)
    assert model.tokenizer.decode([int(bridge.argmax())]) == "7"
    from arithlens.analyses import patching

    assert patching.fast_path_supported(model)


class _FakeDequantized:
    """Stands in for transformers' GGUF loaders: ``save_pretrained`` writes a finished cache's files and
    runs ``during_save`` first (another process finishing at that moment)."""

    def __init__(self, during_save=lambda: None):
        self.config = type("Config", (), {"architectures": ["LlamaForCausalLM"]})()
        self.during_save = during_save

    def save_pretrained(self, directory):  # called for the model, then the tokenizer
        self.during_save()
        self.during_save = lambda: None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text("{}")
        (directory / "model.safetensors").write_text("ours")


def _fake_loaders(monkeypatch, model):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: model)


def test_a_cache_another_process_finished_first_is_kept_not_replaced(tmp_path, monkeypatch):
    """Two kernels dequantizing one GGUF: the later one must not replace the directory the earlier one
    published (and may be loading from); it discards its own copy."""
    monkeypatch.setenv("ARITHLENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = paths.cache_dir() / "models" / "m-0123456789abcdef"

    def other_finishes():
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_text("theirs")
    _fake_loaders(monkeypatch, _FakeDequantized(other_finishes))
    directory, cached = models.dequantize_gguf(gguf, "0123456789abcdef" * 4)
    assert directory == target and not cached
    assert (target / "model.safetensors").read_text() == "theirs"
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temporary copy left


def test_an_unfinished_cache_left_by_a_killed_run_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("ARITHLENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = paths.cache_dir() / "models" / "m-0123456789abcdef"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # config written, weights never were
    _fake_loaders(monkeypatch, _FakeDequantized())
    directory, cached = models.dequantize_gguf(gguf, "0123456789abcdef" * 4)
    assert not cached and (directory / "model.safetensors").read_text() == "ours"
    assert models.dequantize_gguf(gguf, "0123456789abcdef" * 4) == (target, True)


def test_last_position_only_logits_equal_the_full_pass_at_end():
    model = load_model("tiny:qwen2")
    assert models.last_position_only(model) == {"logits_to_keep": 1}
    tokens = torch.randint(0, 60, (3, 9))
    full = model.bridge(tokens, return_type="logits")[:, -1].float()
    torch.testing.assert_close(logits_at_end(model, tokens), full)
