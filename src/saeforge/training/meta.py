"""Meta-SAEs (Pearce et al. 2024, "Showing SAE latents are not atomic using meta-SAEs").

A meta-SAE is a BatchTopK SAE with a small k (default 4) trained on the unit-normalised decoder rows
W_dec[i] / ||W_dec[i]|| of a base SAE: its inputs are the F base features, seen for many epochs. Each
base feature then decomposes into a few meta-latents, and base features sharing a meta-latent share
a component of their direction (e.g. "is about Einstein" shared by physics and German features).

The ordinary Trainer does the training; ``DecoderRows`` is its source: shuffled batches of rows, epoch
after epoch, for as many steps as ``train.total_tokens`` (= rows seen) asks. The result is an ordinary
SAE folder whose metadata names the base SAE and says that its inputs are decoder rows, not activations.
Training takes seconds to minutes (F rows of d_in), so there is no checkpoint: an interrupted run leaves
no folder (save_sae swaps the finished folder in) and is simply run again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from saeforge.config import ConfigError, TrainConfig, from_dict
from saeforge.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from saeforge.saes.formats import load_sae, read_cfg, save_sae
from saeforge.training.trainer import Trainer

INPUTS = "decoder_rows"  # metadata.meta_inputs of a meta-SAE folder


class DecoderRows:
    """Iterable of [batch, d_in] batches of unit decoder rows: each epoch a fresh permutation (seeded), the
    last partial batch of an epoch dropped so every batch has ``batch_size`` rows (BatchTopK's mean-k
    budget is per batch)."""

    def __init__(self, W_dec_FD: torch.Tensor, batch_size: int, seed: int = 0):
        W = W_dec_FD.detach().float().cpu()
        self.rows_FD = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
        self.batch_size, self.seed = min(batch_size, len(W)), seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        F, B = len(self.rows_FD), self.batch_size
        while True:
            perm = torch.randperm(F, generator=g)
            for i in range(0, F - B + 1, B):
                yield self.rows_FD[perm[i : i + B]]


def meta_configs(d_in: int, d_base: int, sae: dict[str, Any], train: dict[str, Any], batch_size: int):
    """(BatchTopKConfig, TrainConfig) with the meta-SAE defaults under the given overrides: d_sae = F / 16
    (at least 2), k = 4, 2000 epochs of the F rows (but at least 20k rows), no LR warm-up beyond 5% of steps."""
    sae = {"d_sae": max(2, d_base // 16), "k": min(4, max(1, d_base // 16)), **sae, "d_in": d_in}
    if "architecture" in sae and sae["architecture"] != "batchtopk":
        raise ConfigError(f"sae.architecture={sae['architecture']!r}: a meta-SAE is a batchtopk SAE")
    sae_cfg = from_dict(BatchTopKConfig, {**sae, "architecture": "batchtopk"}, "sae")
    B = min(batch_size, d_base)
    train_cfg = from_dict(TrainConfig, {"total_tokens": max(2000 * d_base, 20_000), **train}, "train")
    steps = max(1, train_cfg.total_tokens // B)
    defaults = {"lr_warmup_steps": max(1, steps // 20), "log_every_steps": max(1, steps // 20)}
    train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in defaults.items() if k not in train})
    return sae_cfg, train_cfg


def train_meta_sae(
    base_dir: str | Path,
    out: str | Path,
    sae: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    batch_size: int = 4096,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Train a meta-SAE on the decoder rows of the SAE folder ``base_dir`` and save it to ``out``.

    ``sae`` / ``train``: overrides of BatchTopKConfig / TrainConfig fields (``train.total_tokens`` counts
    decoder rows seen). Refuses an existing ``out`` unless ``force`` (a second run never replaces a first
    result by accident)."""
    base_dir, out = Path(base_dir), Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it, or choose another --out")
    base = load_sae(base_dir, device="cpu")
    if base.is_transcoder:
        raise ConfigError(
            f"{base_dir} is a transcoder; a meta-SAE needs an SAE's decoder rows (decoder == input space)"
        )
    if base.d_sae < 2:
        raise ConfigError(f"{base_dir} has {base.d_sae} latent; a meta-SAE needs at least 2 decoder rows")
    sae_cfg, train_cfg = meta_configs(base.d_in, base.d_sae, sae or {}, train or {}, batch_size)
    if sae_cfg.d_sae >= base.d_sae:
        raise ConfigError(
            f"sae.d_sae={sae_cfg.d_sae} >= the base SAE's {base.d_sae} features: a meta-SAE should be narrower "
            "than its base (Pearce et al. use about 1/16)"
        )
    meta = BatchTopKSAE(dataclasses.replace(sae_cfg, device="cpu"))
    meta.init_weights(torch.Generator().manual_seed(train_cfg.seed))
    source = DecoderRows(base.W_dec, batch_size, train_cfg.seed)
    trainer = Trainer(meta, train_cfg, source.batch_size, run_dir=None, progress=progress)
    trainer.fit(source)
    base_meta = read_cfg(base_dir).get("metadata") or {}
    metadata = {
        "meta_inputs": INPUTS,
        "meta_base_sae": str(base_dir.resolve()),
        "meta_base_d_sae": base.d_sae,
        "meta_base_model": base_meta.get("model_name"),
        "meta_base_hook": base_meta.get("hook_name"),
        "meta_train": dataclasses.asdict(train_cfg),
        "meta_batch_size": source.batch_size,
    }
    return save_sae(trainer.export_sae(), out, metadata, trainer.firing_frequency_F())


@torch.no_grad()
def meta_latents(meta_sae, W_dec_FD: torch.Tensor, top: int = 8) -> list[tuple[int, int, int, float]]:
    """Rows (feature, rank, meta_latent, activation): the ``top`` strongest nonzero meta-latents of each base
    feature's unit decoder row, strongest first."""
    rows = DecoderRows(W_dec_FD, len(W_dec_FD)).rows_FD.to(meta_sae.W_enc.device, meta_sae.W_enc.dtype)
    out = []
    for i in range(0, len(rows), 4096):
        f_BM = meta_sae.encode(rows[i : i + 4096]).float().cpu()
        val_BK, idx_BK = f_BM.topk(min(top, f_BM.shape[1]), dim=1)
        for b, (vals, idxs) in enumerate(zip(val_BK.tolist(), idx_BK.tolist())):
            out += [(i + b, r, m, v) for r, (v, m) in enumerate((v, m) for v, m in zip(vals, idxs) if v > 0)]
    return out


def is_meta_sae(folder: str | Path) -> bool:
    return (read_cfg(folder).get("metadata") or {}).get("meta_inputs") == INPUTS
