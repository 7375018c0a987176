"""Toy superposition data with known features, and how well an SAE recovers them (SPECS.md "Ground truth").

    x = sum_i a_i c_i e_i        e_i: n_features unit Gaussian directions in R^d (fixed by the seed)
                                 a_i in {0, 1}: feature i active; c_i ~ U[0, 1]

Uncorrelated: a_i ~ Bernoulli(p_i), p_i proportional to decay^i, scaled so sum_i p_i = mean_active.
Correlated: a_i = 1[z_i > Phi^-1(1 - p_i)] with z ~ N(0, Sigma), Sigma = (1 - rho) I + rho C C^T, C's rows
unit vectors in R^rank: every z_i is N(0, 1), so each feature keeps its rate p_i, but features whose
C rows point the same way fire together.

Recovery is MMCS(true features, decoder rows): for each true feature, the best cosine to any
decoder row, averaged -- 1.0 means every feature has a latent pointing exactly along it.
``saeforge toy --arch NAME`` trains one SAE on this data through the ordinary Trainer and prints
MMCS, L0 and explained variance.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from saeforge.config import ConfigError, F, TrainConfig, add_config_options, from_dict, overrides
from saeforge.evals.dictionaries import mmcs
from saeforge.saes.registry import config_class, names, sae_class
from saeforge.training.trainer import Trainer


@dataclass
class ToyConfig:
    d: int = F(256, "Dimension of the data (the SAE's d_in).")
    n_features: int = F(512, "Number of true feature directions.")
    mean_active: float = F(5.0, "Expected number of active features per sample.")
    decay: float = F(0.99, "Feature i fires with probability proportional to decay^i.")
    correlated: bool = F(False, "Draw active features from a thresholded correlated Gaussian instead of independently.")
    correlation: float = F(0.5, "rho: the share of each latent Gaussian's variance that is shared (correlated only).")
    rank: int = F(8, "Number of shared factors behind the correlations (correlated only).")
    seed: int = F(0, "Seed of the feature directions, rates and correlation structure.")

    def __post_init__(self) -> None:
        if self.d <= 0 or self.n_features <= 0 or self.rank <= 0:
            raise ConfigError(
                f"toy.d={self.d}, toy.n_features={self.n_features}, toy.rank={self.rank}: expected positive sizes"
            )
        if not 0 < self.mean_active < self.n_features:
            raise ConfigError(f"toy.mean_active={self.mean_active}: expected 0 < mean_active < n_features")
        if not 0 < self.decay <= 1 or not 0 <= self.correlation < 1:
            raise ConfigError(
                f"toy.decay={self.decay}, toy.correlation={self.correlation}: expected 0 < decay <= 1, 0 <= rho < 1"
            )


class ToyData:
    """The features and rates of one ToyConfig; ``sample`` draws as many rows as asked, from any generator."""

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg
        # Offset: an SAE initialised with random_directions(seed=s) would otherwise start *at* the
        # true features whenever d_sae == n_features and s == toy.seed (same randn draws).
        g = torch.Generator().manual_seed(7_777_777 + cfg.seed)
        self.features_ND = torch.nn.functional.normalize(torch.randn(cfg.n_features, cfg.d, generator=g), dim=1)
        rate_N = cfg.decay ** torch.arange(cfg.n_features, dtype=torch.float64)
        self.p_N = (rate_N * (cfg.mean_active / rate_N.sum())).clamp(max=1.0).float()
        if (self.p_N >= 1).any():
            raise ConfigError(
                f"toy: mean_active={cfg.mean_active} with decay={cfg.decay} puts a feature's rate at 1; "
                "lower mean_active or raise decay"
            )
        C_NR = torch.nn.functional.normalize(torch.randn(cfg.n_features, cfg.rank, generator=g), dim=1)
        self.shared_NR = C_NR * math.sqrt(cfg.correlation)
        normal = torch.distributions.Normal(0.0, 1.0)
        self.cut_N = normal.icdf(1 - self.p_N.double()).float()

    def active(self, n: int, generator: torch.Generator) -> Tensor:
        """Bool [n, N]: which features are on in each sample."""
        cfg = self.cfg
        if not cfg.correlated:
            return torch.rand(n, cfg.n_features, generator=generator) < self.p_N
        eps_BN = torch.randn(n, cfg.n_features, generator=generator) * math.sqrt(1 - cfg.correlation)
        u_BR = torch.randn(n, cfg.rank, generator=generator)
        return eps_BN + u_BR @ self.shared_NR.T > self.cut_N

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """x [n, d] float32."""
        active_BN = self.active(n, generator)
        coef_BN = torch.zeros(n, self.cfg.n_features)
        # coefficients drawn only where a feature is on: ~5 per row instead of n_features (half the sampling cost)
        coef_BN[active_BN] = torch.rand(int(active_BN.sum()), generator=generator)
        return coef_BN @ self.features_ND

    def batches(self, batch_size: int, seed: int) -> Iterator[Tensor]:
        """An endless stream of batches (a Trainer source)."""
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, g)


# Sparsity settings that work on the default toy data (inputs normalised to E||x|| = sqrt(d)).
TOY_SAE_DEFAULTS: dict[str, dict] = {
    "relu": {"l1_coefficient": 2.0},
    "gated": {"l1_coefficient": 2.0},
    "jumprelu": {"l0_coefficient": 1.0, "threshold_init": 0.5},  # from 0.001 theta needs thousands of steps to rise
    "topk": {"k": 8},
    "batchtopk": {"k": 6},
    "matryoshka": {"k": 6},
}


def train_toy(
    arch: str,
    toy: ToyConfig,
    sae_overrides: dict | None = None,
    train: TrainConfig | None = None,
    d_sae: int = 0,
    batch_size: int = 1024,
    eval_rows: int = 8192,
    progress: bool = False,
) -> dict:
    """Train one SAE on toy data; returns mmcs, l0, explained_variance, seconds and the exported SAE."""
    data = ToyData(toy)
    fields = {**TOY_SAE_DEFAULTS.get(arch, {}), **(sae_overrides or {})}
    fields.update(architecture=arch, d_in=toy.d, d_sae=d_sae or fields.get("d_sae", toy.n_features))
    sae = sae_class(arch)(from_dict(config_class(arch), fields, "sae"))
    train = train or TrainConfig(total_tokens=2_000_000, lr=1e-3, lr_warmup_steps=20)
    sae.init_weights(torch.Generator().manual_seed(train.seed))
    trainer = Trainer(sae, train, batch_size, progress=progress)
    t0 = time.perf_counter()
    trainer.fit(data.batches(batch_size, seed=train.seed + 1))
    seconds = time.perf_counter() - t0
    final = trainer.export_sae()
    x_BD = data.sample(eval_rows, torch.Generator().manual_seed(10_000 + train.seed))  # unseen rows
    with torch.no_grad():
        f_BF = final.encode(x_BD)
        x_hat_BD = final.decode(f_BF)
    ev = 1 - (x_BD - x_hat_BD).double().pow(2).sum() / (x_BD - x_BD.mean(0)).double().pow(2).sum()
    return {
        "arch": arch,
        "mmcs": mmcs(data.features_ND, final.W_dec.detach()),
        "l0": (f_BF != 0).sum().item() / eval_rows,
        "explained_variance": ev.item(),
        "seconds": seconds,
        "steps": trainer.step,
        "sae": final,
    }


# ---- CLI: saeforge toy ------------------------------------------------------------------
def add_commands(sub, arch: str) -> None:
    p = sub.add_parser(
        "toy",
        help="train an SAE on toy superposition data; print MMCS vs the true features, L0, EV",
        description=f"Architectures: {', '.join(names())}. Unset sparsity options take toy defaults "
        f"({TOY_SAE_DEFAULTS}); --sae.d_sae defaults to toy.n_features.",
    )
    p.add_argument("--batch-size", type=int, default=1024, help="rows per step")
    group = p.add_argument_group("toy options")
    for f in dataclasses.fields(ToyConfig):
        group.add_argument(
            f"--toy.{f.name}",
            dest=f"toy.{f.name}",
            default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} (default: {f.default!r})",
        )
    add_config_options(p, ["train"], config_class(arch))
    p.set_defaults(func=cmd_toy)


def cmd_toy(ns: argparse.Namespace, base: dict) -> int:

    o = overrides(ns)
    toy = from_dict(ToyConfig, o.get("toy", {}), "toy")
    sae = dict(o.get("sae", {}))
    arch = sae.pop("architecture", "topk")
    train = from_dict(
        TrainConfig, {"total_tokens": 2_000_000, "lr": 1e-3, "lr_warmup_steps": 20, **o.get("train", {})}, "train"
    )
    r = train_toy(
        arch, toy, sae, train, d_sae=int(sae.pop("d_sae", 0)), batch_size=ns.batch_size, progress=not ns.quiet
    )
    kind = "correlated" if toy.correlated else "uncorrelated"
    print(
        f"{arch} on {kind} toy data (d={toy.d}, {toy.n_features} features, {r['sae'].d_sae} latents, {r['steps']} steps, "
        f"{r['seconds']:.1f} s)"
    )
    print(f"MMCS {r['mmcs']:.4f}   L0 {r['l0']:.2f}   explained variance {r['explained_variance']:.4f}")
    return 0
