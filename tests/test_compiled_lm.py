"""models.compiled: compiled decoder layers in capture() give the eager activations, and run only where safe."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch.testing import assert_close

from saeforge.models import compiled
from saeforge.models.hooks import capture, patched


@pytest.fixture()
def llama(tiny_tokenizer):
    model = tiny.make_model("llama", len(tiny_tokenizer)).eval()
    model.requires_grad_(False)
    return model


def ids(shape, seed=0):
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def calls(model):
    return [layer.__dict__[compiled._ATTR].calls for layer in compiled.decoder_layers(model)]


def test_marked_layers_run_compiled_where_safe_and_eager_elsewhere(llama):
    x = ids((2, 9))
    ref = capture(llama, ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"], x)
    assert compiled.enable(llama, backend="eager") == 3  # the eager backend: dynamo's tracing, no codegen
    got = capture(llama, ["blocks.1.hook_resid_post"], x)
    assert calls(llama) == [1, 1, 0]  # stopped after layer 1: layer 2 never ran
    assert_close(got["blocks.1.hook_resid_post"], ref["blocks.1.hook_resid_post"], rtol=0, atol=0)
    # a hook inside layer 2 (its MLP): that layer runs eagerly, the others compiled
    got = capture(llama, ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"], x)
    assert calls(llama) == [2, 2, 0]
    for name in ref:
        assert_close(got[name], ref[name], rtol=0, atol=0)
    # other batch shapes, an attention mask, or autograd: all eager, no recompiles
    capture(llama, ["blocks.0.hook_resid_post"], ids((1, 5)))
    capture(llama, ["blocks.0.hook_resid_post"], x, torch.ones_like(x))
    with patched(llama, {"blocks.0.hook_attn_out": lambda t: None}):  # someone else's hook inside layer 0
        capture(llama, ["blocks.0.hook_resid_post"], x)
    assert calls(llama) == [2, 2, 0]
    assert all("forward" not in layer.__dict__ for layer in compiled.decoder_layers(llama))  # eager again outside
    with compiled.eager(llama):  # marks set aside for a block, then back with their compiled code
        capture(llama, ["blocks.0.hook_resid_post"], x)
    capture(llama, ["blocks.0.hook_resid_post"], x)
    assert calls(llama) == [3, 2, 0]
    compiled.disable(llama)
    capture(llama, ["blocks.0.hook_resid_post"], x)
    assert all(compiled._ATTR not in layer.__dict__ for layer in compiled.decoder_layers(llama))


@pytest.mark.slow
def test_inductor_compiled_layers_match_eager(llama):
    """The real thing (inductor, C++ codegen): same resid_post activations as the eager forward."""
    x = ids((4, 16), seed=1)
    ref = capture(llama, ["blocks.2.hook_resid_post"], x)["blocks.2.hook_resid_post"]
    compiled.enable(llama)
    for _ in range(2):
        got = capture(llama, ["blocks.2.hook_resid_post"], x)["blocks.2.hook_resid_post"]
        assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert calls(llama) == [2, 2, 2]


def test_compile_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert compiled.compile_policy("auto", cpu, compiled.AUTO_MIN_TOKENS)
    assert not compiled.compile_policy("auto", cpu, compiled.AUTO_MIN_TOKENS - 1)
    assert not compiled.compile_policy("auto", cuda, 10**9)
    assert compiled.compile_policy("on", cuda, 0) and not compiled.compile_policy("off", cpu, 10**9)
    with pytest.raises(ValueError, match="expected auto, on or off"):
        compiled.compile_policy("yes", cpu, 0)


def test_a_failing_compile_falls_back_to_eager_once(llama, caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    x = ids((2, 9))
    ref = capture(llama, ["blocks.1.hook_resid_post"], x)["blocks.1.hook_resid_post"]
    compiled.enable(llama, backend=broken_backend)
    for _ in range(2):
        got = capture(llama, ["blocks.1.hook_resid_post"], x)["blocks.1.hook_resid_post"]
        assert_close(got, ref, rtol=0, atol=0)
    assert calls(llama) == [0, 0, 0]
    assert [layer.__dict__[compiled._ATTR].ok for layer in compiled.decoder_layers(llama)] == [False, False, None]
    assert "running it eagerly" in caplog.text
