"""Ground-truth metrics of several SAEs side by side, with the residual baselines and the time each took (not a test).

For each SAE folder: the per-property table `saeforge probe` prints (coverage, reconstruction F1,
k-sparse probing, TPP, first-letter absorption), then one summary table over all of them: coverage,
reconstruction, 1- and 5-sparse probing accuracy of the latents and of residual dimensions (the
baseline), the dense residual probe, TPP, SAEBench's full-absorption rate and absorption fraction, and
the wall time of the whole probe. The random-weights control is an SAE trained with
`--model.random_init true` (its cfg.json carries the flag, so it is probed on the same random model);
`--model.random_init true` here forces it for every folder given. Results go to --out (JSON), never
into the SAE folders.

    python bench/groundtruth.py runs/*/sae [--tokens 20000] [--probe-tokens 4000] [--out /tmp/groundtruth-bench.json]
"""

from __future__ import annotations

import argparse
import json
import time

from saeforge.config import add_config_options, overrides
from saeforge.evals.report import _json_safe
from saeforge.evals.setup import eval_setup_for
from saeforge.groundtruth.run import format_groundtruth, probe
from saeforge.io import atomic_write_text
from saeforge.models import load_model
from saeforge.saes.formats import load_sae


def _row(r: dict, seconds: float) -> list[str]:
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    def acc(kind, k=None):
        d = r["probing"][kind]
        return fmt((d if k is None else d.get(k, d.get(str(k))))["mean"])

    ab = r.get("absorption", {})
    return [
        r["sae"],
        r["hook"] + (" (random LM)" if r["random_init"] else ""),
        fmt(r["coverage"]["coverage"]),
        fmt(r["reconstruction"]["reconstruction"]),
        acc("sae", 1),
        acc("sae", 5),
        acc("residual", 1),
        acc("residual", 5),
        acc("dense"),
        fmt(r["tpp"].get("mean")),
        fmt(ab.get("full_absorption")),
        fmt(ab.get("absorption_fraction")),
        f"{seconds:.0f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sae_dirs", nargs="+")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--probe-tokens", type=int, default=4000)
    ap.add_argument("--out", default="/tmp/groundtruth-bench.json")
    add_config_options(ap, ["model", "data", "eval"], None)
    ns = ap.parse_args()
    head = ["sae", "hook", "coverage", "recon", "sae k=1", "sae k=5", "res k=1", "res k=5", "dense", "TPP"]
    rows, results, models = [head + ["full abs", "abs frac", "seconds"]], [], {}
    for sae_dir in ns.sae_dirs:
        t0 = time.perf_counter()
        cfg = eval_setup_for(sae_dir, overrides(ns))
        key = (cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.random_init)
        if key not in models:
            models.clear()
            models[key] = load_model(
                cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device, random_init=cfg.model.random_init
            )
        lm = models[key]
        sae = load_sae(sae_dir, device=str(lm.device))
        r = probe(lm, sae, cfg, ns.tokens, ns.probe_tokens, progress=False)
        seconds = time.perf_counter() - t0
        r = {"sae": str(sae_dir), "hook": cfg.model.hook, "random_init": cfg.model.random_init, "seconds": seconds, **r}
        print(f"== {sae_dir} ({cfg.model.hook}, {seconds:.0f} s)")
        print(format_groundtruth(r))
        rows.append(_row(r, seconds))
        results.append(r)
    widths = [max(len(row[j]) for row in rows) for j in range(len(head) + 3)]
    print(
        "\n".join(
            "  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in rows
        )
    )
    atomic_write_text(ns.out, json.dumps(_json_safe(results), indent=2) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
