"""Typed configs for building a feature database (``saeforge index``) and serving it."""

from __future__ import annotations

from dataclasses import dataclass

from saeforge.config import F, check


@dataclass
class IndexConfig:
    """Options of ``saeforge index`` / ``viewer.index.build_index``: tokens, contexts kept per feature, histograms."""

    tokens: int = F(
        1_000_000,
        "Corpus tokens to run through the LM and SAE (whole windows; BOS positions are not counted as firings).",
    )
    part: str = F("train", "Corpus part to read: train or heldout (the SAE's own document split).")
    top_k: int = F(16, "Max-activating contexts kept per feature (at most one per window, centred on its maximum).")
    quantile_intervals: int = F(4, "Activation-quantile intervals to sample contexts from.")
    per_interval: int = F(
        5, "Contexts per quantile interval (a uniform sample of firing windows, split by activation)."
    )
    left: int = F(24, "Tokens kept before each context's maximum.")
    right: int = F(8, "Tokens kept after each context's maximum.")
    hist_bins: int = F(64, "Activation-histogram bins (power-of-two widths, doubled as larger activations arrive).")
    n_logits: int = F(10, "Logit-lens tokens kept per feature on each side (top and bottom).")
    n_neighbours: int = F(10, "Nearest features by decoder cosine kept per feature.")
    lm_batch_size: int = F(16, "Windows per LM forward pass (one accumulator update per pass).")
    checkpoint_every: int = F(64, "LM passes between resumable checkpoints of the accumulators.")
    seed: int = F(0, "Seed for the uniform context sample (quantile intervals).")
    name: str = F("", "SAE id in URLs and the API (default: the run folder's name).")
    map_method: str = F(
        "auto",
        "Dictionary map layout: umap (umap-learn, cosine), pca, none, or auto (umap when installed and the SAE "
        "has >= 256 features, else pca).",
    )
    map_clusters: int = F(16, "Clusters the decoder-direction tree is cut into for the map's colours.")
    first_ratio: float = F(
        5.0,
        "Flag a feature as a first-position artefact when its max at the first token after BOS is >= this "
        "many times its max anywhere else.",
    )

    def __post_init__(self) -> None:
        check(self.tokens > 0, "index.tokens must be positive")
        check(self.part in ("train", "heldout"), f"index.part={self.part!r}: expected train or heldout")
        for f in ("top_k", "quantile_intervals", "per_interval", "hist_bins", "lm_batch_size", "checkpoint_every"):
            check(getattr(self, f) > 0, f"index.{f} must be positive")
        check(self.hist_bins % 2 == 0, "index.hist_bins must be even (bins merge in pairs)")
        check(
            self.map_method in ("auto", "pca", "umap", "none"),
            f"index.map_method={self.map_method!r}: expected auto, pca, umap or none",
        )
        check(self.map_clusters > 0, "index.map_clusters must be positive")
        check(self.first_ratio > 1, "index.first_ratio must be > 1")
        check(self.left >= 0 and self.right >= 0, "index.left/right must be >= 0")
