"""FVD: the Frechet distance against scipy, the pipeline against features computed directly,
known shifts, resume, ranks, and the detector's checksum pin (a TorchScript stand-in with the
I3D's call convention: tests/eval/detector_standin.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbp_mega.eval import (
    DetectorError,
    FeatureStats,
    FVDConfig,
    compute_fvd,
    frechet_distance,
    fvd_config,
    load_detector,
    prepare,
    set_statistics,
)
from nbp_mega.eval.fvd import TensorSource, load_stats
from tests.eval.detector_standin import write_standin
from tests.spawn import run_distributed


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (the reference code's)."""
    linalg = pytest.importorskip("scipy.linalg")  # a test-only dependency
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def random_gaussian(rng, dim: int, n: int, shift: float = 0.0) -> np.ndarray:
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mix + shift * rng.normal(size=dim)


def test_frechet_distance_agrees_with_scipy_on_random_gaussians():
    rng = np.random.default_rng(0)
    for dim, n in ((8, 50), (64, 300), (400, 600)):
        a, b = random_gaussian(rng, dim, n), random_gaussian(rng, dim, n, shift=0.5)
        args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert frechet_distance(*args) == pytest.approx(scipy_frechet(*args), rel=1e-7)
        assert frechet_distance(*args[:2], *args[:2]) == pytest.approx(0, abs=1e-8 * dim)


def test_streamed_statistics_are_the_whole_sets():
    """Batches of uneven sizes merged (also a merge of two halves, as ranks do) give numpy's
    mean and covariance of all rows at once."""
    x = np.random.default_rng(1).normal(3.0, 2.0, size=(103, 16))
    stats = FeatureStats()
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 103)):
        stats.update(x[lo:hi])
    halves = FeatureStats().update(x[:50]).merge(FeatureStats().update(x[50:]))
    for s in (stats, halves):
        assert s.count == 103
        np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureStats().update(np.full((2, 3), np.nan))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    return path, write_standin(path)


def videos(seed: int, n: int, frames: int = 17, size: int = 40, lo=0.2, hi=0.7) -> torch.Tensor:
    """[n, 3, frames, size, size + 8] in [lo, hi]: not square, so the crop matters."""
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, 3, frames, size, size + 8, generator=g)


def test_prepare_resizes_the_short_side_crops_the_centre_and_rescales():
    """A frame 40 x 48: short side to 224 (bilinear) -> 224 x 269, centre 224 columns; the
    first 16 frames; [0, 1] -> [-1, 1]."""
    v = videos(2, 2)
    x = prepare(v, frames=16)
    assert x.shape == (2, 3, 16, 224, 224)
    frame = F.interpolate(v[:, :, 3], size=(224, 269), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x[:, :, 3], frame[:, :, :, 22:246] * 2 - 1)
    small = prepare(v, frames=16, resolution=20)  # K600: evaluated at 64x64 first
    low = F.interpolate(v[:, :, 0], size=(20, 20), mode="bilinear", antialias=True)
    torch.testing.assert_close(small[:, :, 0], F.interpolate(low, size=(224, 224),
                                                             mode="bilinear") * 2 - 1)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        prepare(v * 255, frames=16)
    with pytest.raises(ValueError, match="first 16"):
        prepare(v[:, :, :8], frames=16)


def test_fvd_is_the_frechet_distance_of_the_detectors_features(standin):
    """compute_fvd on tensors and on iterables of batches (streamed) = the distance computed
    from the stand-in's features of all videos at once with numpy and scipy."""
    path, module = standin
    real, fake = videos(3, 24), videos(4, 20, lo=0.1, hi=0.9)
    with torch.no_grad():
        fr, ff = (module(prepare(v, frames=16)).double().numpy() for v in (real, fake))
    direct = scipy_frechet(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0),
                           np.cov(ff, rowvar=False))
    assert direct > 1
    assert compute_fvd(real, fake, detector_path=str(path), batch_size=7) == \
        pytest.approx(direct, rel=1e-6)
    streamed = compute_fvd(iter(real.split(5)), iter(fake.split(9)), detector_path=str(path))
    assert streamed == pytest.approx(direct, rel=1e-6)


def test_identical_sets_give_zero_and_a_shift_moves_fvd_by_its_squared_norm(standin):
    """A set against itself: ~0. Adding c to every pixel moves the (linear) stand-in's features
    by a known offset and leaves their covariance: FVD = |offset|^2, at any batch size."""
    path, module = standin
    real = videos(5, 24)
    assert compute_fvd(real, real, detector_path=str(path)) == pytest.approx(0, abs=1e-6)
    c = 0.1
    expected = float(module.offset(2 * c).detach().double().square().sum())  # [0, 1] -> [-1, 1]: 2c
    got = compute_fvd(real, real + c, detector_path=str(path), batch_size=5)
    assert got == pytest.approx(expected, rel=1e-6)
    assert compute_fvd(real, real + 2 * c, detector_path=str(path)) == \
        pytest.approx(4 * expected, rel=1e-6)


class CountingSource(TensorSource):
    """A TensorSource that counts the videos it served and can fail at a given batch."""

    def __init__(self, data, fail_at: int | None = None):
        super().__init__(data, "counted")
        self.served, self.fail_at, self.calls = 0, fail_at, 0

    def videos(self, lo, hi):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        self.served += hi - lo
        return super().videos(lo, hi)


def test_an_interrupted_set_resumes_from_its_saved_state_to_the_same_statistics(standin, tmp_path):
    path, _ = standin
    detector = load_detector(str(path))
    cfg = FVDConfig(batch_size=3, save_every=2)
    data = videos(6, 20)  # 7 batches
    whole = set_statistics(CountingSource(data), detector, cfg)
    out = str(tmp_path / "fake.npz")
    first = CountingSource(data, fail_at=6)  # batches 1-5 done, the state saved after 4
    with pytest.raises(KeyboardInterrupt):
        set_statistics(first, detector, cfg, path=out)
    second = CountingSource(data)
    resumed = set_statistics(second, detector, cfg, path=out)
    assert second.served == 20 - 4 * 3  # only what the saved state did not hold
    assert resumed.count == 20
    np.testing.assert_array_equal(resumed.mean, whole.mean)  # bit-exact: same merges
    np.testing.assert_array_equal(resumed.cov, whole.cov)
    again = CountingSource(data)
    set_statistics(again, detector, cfg, path=out)  # finished: read back, nothing computed
    assert again.served == 0
    with pytest.raises(ValueError, match="another set or protocol.*frames"):
        set_statistics(again, detector, FVDConfig(batch_size=3, frames=8), path=out)


def _ranks_worker(detector_path: str, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        detector = load_detector(detector_path)
        stats = set_statistics(TensorSource(videos(7, 22)), detector, FVDConfig(batch_size=4),
                               path=out)
        return stats.count, stats.mean, stats.cov
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_stream_halves_and_give_the_statistics_of_one(standin, tmp_path):
    path, _ = standin
    out = str(tmp_path / "ranks.npz")
    results = run_distributed(_ranks_worker, 2, args=(str(path), out))
    one = set_statistics(TensorSource(videos(7, 22)), load_detector(str(path)),
                         FVDConfig(batch_size=4))
    for count, mean, cov in results:  # the fp32 stand-in sums in another order on 1 thread
        assert count == 22
        np.testing.assert_allclose(mean, one.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(cov, one.cov, rtol=1e-4, atol=1e-7)
    stored, meta = load_stats(out)
    assert stored.count == 22 and meta["detector_sha256"] and "world" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranks.npz"]  # states removed


def test_the_checksum_pin_refuses_a_changed_detector(standin, tmp_path):
    path, _ = standin
    pinned = load_detector(str(path)).sha256
    other = tmp_path / "i3d_torchscript.pt"
    write_standin(other, seed=1)  # same name and convention, other weights
    with pytest.raises(DetectorError, match=f"sha256 .* the pin is {pinned}"):
        load_detector(str(other), sha256=pinned)
    with pytest.raises(DetectorError, match="sha256"):
        compute_fvd(videos(0, 4), videos(1, 4), detector_path=str(other),
                    detector_sha256=pinned)
    assert load_detector(str(other), sha256=pinned, allow_other=True).sha256 != pinned
    assert load_detector(str(path), sha256=pinned.upper()).sha256 == pinned
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(DetectorError, match="not a TorchScript file"):
        load_detector(str(tmp_path / "junk.pt"))
    with pytest.raises(DetectorError, match="no such file"):
        load_detector(str(tmp_path / "missing.pt"))


def test_protocol_presets_and_their_overrides():
    ucf = fvd_config({"protocol": "ucf101"})
    assert (ucf.samples, ucf.folds, ucf.fps, ucf.frames, ucf.resolution) == (10_000, 4, 8, 16, 128)
    k600 = fvd_config({"protocol": "k600", "samples": 64})
    assert (k600.samples, k600.eval_resolution, k600.context_frames) == (64, 64, 5)
    stylegan = fvd_config({"protocol": "fvd2048_16f", "resolution": 256})
    assert (stylegan.samples, stylegan.reference_clips, stylegan.folds, stylegan.resolution) \
        == (2048, 2048, 1, 256)
    with pytest.raises(ValueError, match="unknown config key 'fvd.sample'"):
        fvd_config({"sample": 3})
    with pytest.raises(ValueError, match="fvd.context_frames=16"):
        fvd_config({"context_frames": 16})


@pytest.mark.gpu
def test_fvd_on_a_gpu_is_the_cpus(standin):
    """Detector and resizing on CUDA (fvd device=cuda): the CPU's FVD to fp32 rounding."""
    path, _ = standin
    real, fake = videos(8, 12), videos(9, 12, lo=0.1, hi=0.9)
    cpu = compute_fvd(real, fake, detector_path=str(path), batch_size=4)
    cuda = compute_fvd(real, fake, detector_path=str(path), batch_size=4, device="cuda")
    assert cuda == pytest.approx(cpu, rel=1e-4)
