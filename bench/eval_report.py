"""Time `saeforge eval --report --compare` on the bundled model and the demo SAE (not a test).

Builds two SAEs derived from the demo one so there is something to compare against without training:
the same dictionary with k=16 (a sparser point on the Pareto plot; MMCS 1 with the original) and the
first half of its latents (a narrower dictionary, for the stitching split). Evaluates at 256-token
windows, twice what the demo trained on, to show the per-position curve past the training length.

    .venv/bin/python bench/eval_report.py [--sae runs/demo-smollm2-topk/sae] [--out /tmp/saeforge-eval-bench]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file, save_file


def derive(src: Path, dst: Path, k: int | None = None, keep: int | None = None) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    (dst / "eval.json").unlink(missing_ok=True)
    cfg = json.loads((dst / "cfg.json").read_text())
    if k is not None:
        cfg["k"] = k
        cfg["metadata"]["saeforge_config"]["sae"]["k"] = k
    if keep is not None:
        w = load_file(str(dst / "sae_weights.safetensors"))
        w = {
            "W_enc": w["W_enc"][:, :keep].contiguous(),
            "b_enc": w["b_enc"][:keep].contiguous(),
            "W_dec": w["W_dec"][:keep].contiguous(),
            "b_dec": w["b_dec"],
        }
        save_file(w, str(dst / "sae_weights.safetensors"))
        (dst / "sparsity.safetensors").unlink(missing_ok=True)
        cfg["d_sae"] = keep
        cfg["metadata"]["saeforge_config"]["sae"]["d_sae"] = keep
    (dst / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="runs/demo-smollm2-topk/sae")
    ap.add_argument("--out", default="/tmp/saeforge-eval-bench")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ce-tokens", type=int, default=2048)
    a = ap.parse_args()
    out = Path(a.out)
    main_sae = derive(Path(a.sae), out / "topk32" / "sae")
    k16 = derive(Path(a.sae), out / "topk16" / "sae", k=16)
    half = derive(Path(a.sae), out / "half2304" / "sae", keep=2304)

    from saeforge import cli

    t0 = time.perf_counter()
    cli.main(
        [
            "eval",
            str(main_sae),
            "--report",
            "--compare",
            str(k16),
            str(half),
            "--quiet",
            "--data.context_size",
            str(a.context),
            "--eval.tokens",
            str(a.tokens),
            "--eval.ce_tokens",
            str(a.ce_tokens),
        ]
    )
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = json.loads((main_sae / "eval.json").read_text())
    bp = m["by_position"]
    print(
        f"\n3 SAEs, {a.tokens} recon + {a.ce_tokens} CE tokens each at context {a.context}: {dt:.1f} s, "
        f"peak RSS {peak:.0f} MiB"
    )
    print(
        "EV by position:", [f"{s}-{e - 1}:{v:.3f}" for s, e, v in zip(bp["start"], bp["end"], bp["explained_variance"])]
    )
    print("CE score by position:", [f"{s}-{e - 1}:{v:.3f}" for s, e, v in zip(bp["start"], bp["end"], bp["ce_score"])])
    print("MDL:", {k: m["mdl"][k] for k in ("dl_bits", "n_bins", "epsilon", "mse_unquantised")})
    print("dictionaries:", json.dumps(m["dictionaries"], indent=1))
    print(f"report: {main_sae / 'report.html'}")


if __name__ == "__main__":
    main()
