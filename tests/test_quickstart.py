"""The README's Python quickstart runs as written, and prints the features a direct computation finds.

The block is taken from the README (the first ```python block under "## Quickstart") and executed with
three strings swapped for test stand-ins: the bundled model becomes a tiny Llama built in-process, the
demo SAE a TopK SAE trained here in a few seconds, and layer 3 (the tiny model has 3 layers) layer 1.
The oracle recomputes the latents without saeforge: the HF model's own hidden states and the
TopK formula on the saved weights.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saeforge.cli import main

ROOT = Path(__file__).resolve().parent.parent
MODEL, SAE_DIR, HOOK = "smollm2-135m", "runs/demo-smollm2-topk/sae", "blocks.3.hook_resid_post"
TINY_HOOK, TINY_LAYER, K = "blocks.1.hook_resid_post", 1, 8


def quickstart_code() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart", 1)
    assert len(section) == 2, "README.md has no '## Quickstart' section"
    block = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert block, "the Quickstart section has no ```python block"
    return block.group(1)


@pytest.fixture(scope="module")
def tiny_sae(tiny_model_dirs, text_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    rc = main(
        [
            "train",
            "--model",
            tiny_model_dirs["llama"],
            "--hook",
            TINY_HOOK,
            "--corpus",
            text_corpus,
            "--data.context_size",
            64,
            "--data.holdout_fraction",
            0.2,
            "--tokens",
            8192,
            "--activations.batch_size",
            256,
            "--activations.shuffle_sequences",
            32,
            "--arch",
            "topk",
            "--sae.d_sae",
            256,
            "--sae.k",
            K,
            "--train.out_dir",
            out,
            "--name",
            "qs",
            "--no-eval",
            "--quiet",
        ]
    )
    assert rc == 0
    return out / "qs" / "sae"


def test_readme_quickstart_prints_the_top_features_of_a_direct_computation(tiny_model_dirs, tiny_sae):
    code = quickstart_code()
    for real in (MODEL, SAE_DIR, HOOK):
        assert f'"{real}"' in code, f"the quickstart no longer uses {real!r}: update this test's stand-ins"
    code = (
        code.replace(f'"{MODEL}"', repr(str(tiny_model_dirs["llama"])))
        .replace(f'"{SAE_DIR}"', repr(str(tiny_sae)))
        .replace(f'"{HOOK}"', repr(TINY_HOOK))
    )
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md:Quickstart", "exec"), scope)
    printed = [(int(i), float(v)) for i, v in re.findall(r"feature (\d+): ([0-9.]+)", out.getvalue())]
    assert len(printed) == 5, out.getvalue()

    # Oracle: the same tokens through the plain HF model, latents from the saved weights by the TopK formula.
    from transformers import AutoModelForCausalLM

    lm = scope["lm"]
    ids_1T = scope["ids_1T"]
    assert ids_1T[0, 0].item() == lm.tokenizer.bos_token_id and ids_1T.shape[1] > 2  # BOS first, as in training
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        x_TD = hf(input_ids=ids_1T.cpu(), output_hidden_states=True).hidden_states[TINY_LAYER + 1][0, 1:]
    w = load_file(str(tiny_sae / "sae_weights.safetensors"))
    pre_TF = (x_TD - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals_TK, idx_TK = pre_TF.topk(K, dim=-1)
    f_TF = torch.zeros_like(pre_TF).scatter_(-1, idx_TK, vals_TK.relu())
    want = f_TF.max(dim=0).values.topk(5)

    assert [i for i, _ in printed] == want.indices.tolist()
    assert [v for _, v in printed] == pytest.approx(want.values.tolist(), abs=0.006)  # printed with 2 decimals
    assert all(v > 0 for _, v in printed) and all(0 <= i < 256 for i, _ in printed)
