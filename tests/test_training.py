"""Trainer: schedules, learning on synthetic data, and resume == uninterrupted."""

import dataclasses
import json

import pytest
import torch

from saeforge.activations.batcher import ShuffledBatcher
from saeforge.config import TrainConfig
from saeforge.saes.registry import config_class, sae_class
from saeforge.training.schedules import lr_factor, sparsity_factor
from saeforge.training.trainer import CHECKPOINT, METRICS, Trainer

D, F_ = 16, 64


def synthetic_source(seed=0, n_chunks=40, rows=300):
    """Sparse combinations of 32 fixed directions: an SAE can learn them."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(32, D, generator=g)
    chunks = []
    for _ in range(n_chunks):
        coef = torch.rand(rows, 32, generator=g) * (torch.rand(rows, 32, generator=g) < 0.1)
        chunks.append(coef @ dirs * 3.0 + 1.0)
    return ShuffledBatcher(lambda i: chunks[i] if i < len(chunks) else None, batch_size=128, seed=seed)


def make_sae(arch, seed=0):
    extra = {"k": 4} if arch == "topk" else {"l1_coefficient": 0.5}  # toy data: a light penalty
    cfg = config_class(arch)(d_in=D, d_sae=F_, **extra)
    sae = sae_class(arch)(cfg)
    sae.init_weights(torch.Generator().manual_seed(seed))
    if arch == "gated":
        with torch.no_grad():
            sae.b_gate[:8] = -3.0  # dead from the start, so ghost grads have work to do
    return sae


def train_cfg(**kw):
    base = dict(
        total_tokens=128 * 60,
        lr=1e-2,
        lr_warmup_steps=5,
        checkpoint_every_steps=7,
        log_every_steps=5,
        dead_after_tokens=2000,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_shape():
    n = 100
    f = [lr_factor(s, n, warmup_steps=10, decay_fraction=0.2) for s in range(n)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert sparsity_factor(0, 100, 0.05) == pytest.approx(0.2) and sparsity_factor(4, 100, 0.05) == 1.0
    assert sparsity_factor(0, 100, 0.0) == 1.0


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_trainer_learns_and_logs(tmp_path, arch):
    sae = make_sae(arch)
    tr = Trainer(sae, train_cfg(), batch_size=128, run_dir=tmp_path, progress=False)
    tr.fit(synthetic_source())
    lines = [json.loads(ln) for ln in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(5, 61, 5))
    assert lines[-1]["explained_variance"] > 0.8, lines[-1]
    assert lines[-1]["explained_variance"] > lines[0]["explained_variance"]
    # the scale makes E||c x|| = sqrt(d_in); the exported SAE must work on raw x with the same latents
    x = next(iter(synthetic_source(seed=5)))
    raw = tr.export_sae()
    torch.testing.assert_close(raw.encode(x), sae.encode(x * tr.scale), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw(x), sae(x * tr.scale) / tr.scale, rtol=1e-4, atol=1e-4)


class Interrupt(Exception):
    pass


def interrupted(source, after):
    for i, x in enumerate(source):
        if i == after:
            raise Interrupt
        yield x


RESUME_CASES = [
    ("relu", {}),
    ("topk", {}),
    # resampling (Adam moments, firing counters) and p-annealing (lambda rescale, probe sums) state
    (
        "relu",
        {
            "dead_latents": "resample",
            "resample_every_steps": 30,
            "dead_after_tokens": 128 * 4,
            "p_end": 0.5,
            "p_anneal_updates": 6,
            "p_anneal_start_fraction": 0.1,
        },
    ),
    ("gated", {"dead_latents": "ghost"}),
]


@pytest.mark.parametrize("arch, extra", RESUME_CASES, ids=["relu", "topk", "relu-resample-panneal", "gated-ghost"])
@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, arch, extra):
    cfg = train_cfg(**extra)

    def make_sae(arch, seed=0):
        sae = globals()["make_sae"](arch, seed)
        if extra.get("dead_latents") == "resample":
            with torch.no_grad():
                sae.b_enc[:8] = -1e6  # dead until resampled at step 30, by the resumed run
        return sae

    full = Trainer(make_sae(arch), cfg, 128, tmp_path / "full", progress=False)
    (tmp_path / "full").mkdir()
    full.fit(synthetic_source())

    (tmp_path / "cut").mkdir()
    first = Trainer(make_sae(arch), cfg, 128, tmp_path / "cut", progress=False)
    src = synthetic_source()
    with pytest.raises(Interrupt):
        first.fit(_Positioned(src, after=33))  # dies between checkpoints (7, 14, ..., 28 saved)
    ck = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)
    assert ck["step"] == 28
    with open(tmp_path / "cut" / METRICS, "a") as fh:  # killed while appending a log line
        fh.write('{"step": 35, "loss": 0.1')

    second = Trainer(make_sae(arch, seed=99), cfg, 128, tmp_path / "cut", progress=False)
    src2 = synthetic_source()
    assert second.resume(src2) and second.step == 28
    second.fit(src2)
    for name, p in full.sae.state_dict().items():
        torch.testing.assert_close(second.sae.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert torch.equal(full.tokens_since_fired_F, second.tokens_since_fired_F)
    assert second.anneal.lambda_scale == full.anneal.lambda_scale
    if extra.get("p_end"):  # the annealing really rescaled lambda before and after the cut at 28
        assert full.anneal.lambda_scale != 1.0 and [s for s in full.anneal.change_steps if s > 28]
    # the metrics log of the resumed run has no duplicate or lost steps
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "cut" / METRICS).read_text().splitlines()]
    assert steps == list(range(5, 61, 5))


class _Positioned:
    """Wraps a resumable source and raises after ``after`` batches, like a killed process."""

    def __init__(self, source, after):
        self.source, self.after = source, after

    def __iter__(self):
        return interrupted(self.source, self.after)

    def state_dict(self):
        return self.source.state_dict()


def test_autocast_auto_follows_the_bf16_fast_switch(monkeypatch):
    monkeypatch.setenv("SAEFORGE_BF16_FAST", "1")
    assert Trainer(make_sae("topk"), train_cfg(), 128, progress=False).autocast is True
    assert Trainer(make_sae("topk"), train_cfg(autocast="off"), 128, progress=False).autocast is False
    monkeypatch.setenv("SAEFORGE_BF16_FAST", "0")
    assert Trainer(make_sae("topk"), train_cfg(), 128, progress=False).autocast is False
    assert Trainer(make_sae("topk"), train_cfg(autocast="on"), 128, progress=False).autocast is True
    monkeypatch.setenv("SAEFORGE_BF16_FAST", "fast")
    with pytest.raises(ValueError, match="SAEFORGE_BF16_FAST='fast'"):
        Trainer(make_sae("topk"), train_cfg(), 128, progress=False)


def test_dead_latents_are_counted(tmp_path):
    sae = make_sae("relu")
    with torch.no_grad():
        sae.b_enc[:8] = -1e6  # these latents can never fire
    tr = Trainer(
        sae,
        dataclasses.replace(train_cfg(), total_tokens=128 * 20, dead_after_tokens=128 * 10),
        128,
        None,
        progress=False,
    )
    tr.fit(synthetic_source())
    assert tr.dead_mask_F[:8].all()
    assert tr.tokens_since_fired_F[:8].eq(128 * 20).all()


def test_geometric_median_beats_the_mean_on_outliers():
    from saeforge.saes.topk import geometric_median

    # the geometric median of 3 collinear points is the middle one, whatever the outlier's size
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])
    torch.testing.assert_close(geometric_median(pts, iters=500), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)
    # and it minimises the summed distance: any nudge increases it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) + torch.tensor([3.0, 0, 0, 0, 0])
    m = geometric_median(x)
    cost = lambda p: (x - p).norm(dim=1).sum()  # noqa: E731
    for d in torch.eye(5):
        assert cost(m) < cost(m + 0.01 * d) and cost(m) < cost(m - 0.01 * d)


def test_topk_b_dec_starts_at_the_data_geometric_median(tmp_path):
    from saeforge.saes.topk import geometric_median

    sae = make_sae("topk")
    tr = Trainer(sae, dataclasses.replace(train_cfg(), total_tokens=128), 128, None, progress=False)
    src = synthetic_source()
    first = next(iter(synthetic_source()))
    tr.prepare(tr._batches(src))
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(first * tr.scale), rtol=1e-5, atol=1e-5)


def test_the_log_says_how_long_training_waited_for_batches(tmp_path):
    import time

    def slow(source, pause=0.03):  # a source that takes `pause` seconds per batch, like a live LM
        for x in source:
            time.sleep(pause)
            yield x

    tr = Trainer(make_sae("topk"), train_cfg(total_tokens=128 * 20), batch_size=128, run_dir=tmp_path, progress=False)
    tr.fit(slow(synthetic_source()))
    last = json.loads((tmp_path / METRICS).read_text().splitlines()[-1])
    assert 20 * 0.03 <= last["source_s"] < last["elapsed_s"]  # every wait counted, the SAE steps not
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["source_seconds"] == pytest.approx(last["source_s"])
