"""docs/tutorial.ipynb executes top to bottom in a real Jupyter kernel, on a tiny model, and its cells compute.

The cell tagged "parameters" runs as written; a cell inserted after it (as papermill injects parameters)
swaps the bundled model, corpus and sizes for tiny stand-ins. A last cell reports what the notebook
computed, and the test checks it against direct computations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"

pytestmark = pytest.mark.slow

REPORT = """import json
print("REPORT " + json.dumps({
    "ev": ev, "l0": result.metrics["l0"], "eval_json": json.loads((result.sae_dir / "eval.json").read_text()),
    "features": features, "feature": FEATURE, "fires": fires, "promoted": promoted,
    "clean": steer.clean, "steered": steer.steered, "hooks": hooks, "acts_shape": list(acts_1TD.shape),
    "n_ids": ids_1T.shape[1], "sae_dir": str(result.sae_dir),
}))"""


def test_tutorial_notebook_runs_on_a_tiny_model(tiny_model_dirs, text_corpus, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (i,) = [n for n, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    tiny = {
        "MODEL": str(tiny_model_dirs["llama"]),
        "HOOK": "blocks.1.hook_resid_post",
        "CORPUS": str(text_corpus),
        "CONTEXT": 64,
        "HOLDOUT": 0.2,
        "TRAIN_TOKENS": 8192,
        "D_SAE": 128,
        "K": 8,
        "EVAL_TOKENS": 2048,
        "CE_TOKENS": 512,
        "OUT_DIR": str(tmp_path / "runs"),
        "STEER_ALPHA": 200.0,
    }
    injected = "\n".join(f"{k} = {v!r}" for k, v in tiny.items())
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))

    # the kernel is a child process of this one: it imports the saeforge under test through PYTHONPATH
    src = str(ROOT / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    got = json.loads(out.split("REPORT ", 1)[1])
    # the tiny Llama: 3 layers x 5 hook kinds, width 64; the text's tokens plus BOS
    assert len(got["hooks"]) == 15 and got["acts_shape"] == [1, got["n_ids"], 64]
    # the numbers printed are the evaluation's, as saved in eval.json
    assert -1.0 <= got["ev"] <= 1.0 and got["ev"] == got["eval_json"]["explained_variance"]
    assert got["l0"] == pytest.approx(8.0)  # TopK k=8 fires exactly 8 latents on every token
    assert Path(got["sae_dir"]) == tmp_path / "runs" / "tutorial" / "sae"
    # a feature that fires, the tokens it fires on, and what it promotes
    assert got["features"] and got["feature"] == got["features"][0]
    assert got["fires"] and all(a > 0 for _, a in got["fires"]) and len(got["promoted"]) == 8
    # steering changes the greedy continuation
    assert got["clean"] != got["steered"]
