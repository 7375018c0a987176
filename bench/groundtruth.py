"""Ground-truth metrics of several SAEs side by side, with the residual baselines and the time each took (not a test).

Arguments are SAE folders, run folders, sweep folders or transcoders folders (a folder expands to
every SAE in it, as for `saeforge probe`). SAEs of one model are probed together by
`groundtruth.run.probe_many`: one LM pass over the labelled tokens for every hook, the residual
baselines once per hook. For each SAE: the per-property table `saeforge probe` prints, then one
summary table over all of them: architecture, L0, coverage, reconstruction, 1- and 5-sparse probing
accuracy of the latents and of residual dimensions (the baseline), the dense residual probe, TPP,
SAEBench's full-absorption rate and absorption fraction, and the seconds from the previous SAE's
result to this one's (the first SAE of a model also carries the shared LM pass and baselines; the
total is printed at the end). The random-weights control is an SAE trained with
`--model.random_init true` (its cfg.json carries the flag, so it is probed on the same random model);
`--model.random_init true` here forces it for every folder given. Results go to --out (JSON), never
into the SAE folders.

    python bench/groundtruth.py runs/*/sae runs/SWEEP [--tokens 20000] [--probe-tokens 4000] [--out /tmp/groundtruth-bench.json]
"""

from __future__ import annotations

import argparse
import json
import time

from saeforge.config import add_config_options, overrides
from saeforge.evals.report import _json_safe
from saeforge.evals.setup import eval_setup_for
from saeforge.groundtruth.folders import expand
from saeforge.groundtruth.run import format_groundtruth, models_in_turn, probe_many
from saeforge.io import atomic_write_text
from saeforge.saes.formats import load_sae, trained_architecture


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
        r["architecture"],
        f"{r['l0']:.1f}",
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
    ap.add_argument("dirs", nargs="+", help="SAE, run, sweep or transcoders folders")
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--probe-tokens", type=int, default=4000)
    ap.add_argument("--out", default="/tmp/groundtruth-bench.json")
    add_config_options(ap, ["model", "data", "eval"], None)
    ns = ap.parse_args()
    sae_dirs = [s for d in ns.dirs for s in expand(d)[0]]
    cfgs = [eval_setup_for(d, overrides(ns)) for d in sae_dirs]
    head = ["sae", "hook", "arch", "L0", "coverage", "recon", "sae k=1", "sae k=5", "res k=1", "res k=5", "dense"]
    head += ["TPP", "full abs", "abs frac", "seconds"]
    results: list = [None] * len(sae_dirs)
    start = time.perf_counter()
    for lm, idx in models_in_turn(cfgs):
        saes = [(load_sae(sae_dirs[i], device=str(lm.device)), cfgs[i]) for i in idx]
        last = [time.perf_counter()]

        def done(j: int, r: dict, idx=idx, last=last) -> None:  # defaults bind this model's group
            now = time.perf_counter()
            i, m = idx[j], cfgs[idx[j]].model
            results[i] = {"sae": str(sae_dirs[i]), "hook": m.hook, "random_init": m.random_init, **r}
            results[i]["architecture"] = trained_architecture(sae_dirs[i])  # not the JumpReLU it is saved as
            results[i]["seconds"] = now - last[0]
            last[0] = now

        probe_many(lm, saes, ns.tokens, ns.probe_tokens, progress=False, on_result=done)
        del lm
    for r in results:
        print(f"== {r['sae']} ({r['hook']}, {r['seconds']:.0f} s)")
        print(format_groundtruth(r))
    rows = [head] + [_row(r, r["seconds"]) for r in results]
    widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
    print(
        "\n".join(
            "  ".join(v.ljust(w) if j < 3 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in rows
        )
    )
    print(f"{len(results)} SAEs in {time.perf_counter() - start:.0f} s")
    atomic_write_text(ns.out, json.dumps(_json_safe(results), indent=2) + "\n")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
