"""Feature statistics and the Frechet distance between two Gaussians, in float64.

    stats = FeatureStats(); stats.update(features)            # features [B, D], any float
    d = frechet_distance(real.mean, real.cov, fake.mean, fake.cov)

FeatureStats keeps (count, mean, centred sum of squares) and merges batches with Chan et
al.'s pairwise update, so a set streamed in batches, split over ranks or resumed from a saved
state gives the statistics of the whole set without holding it (and without the cancellation
of sum(x x^T) - n mu mu^T). D is the feature width (400 for the Kinetics-400 I3D).
"""

from __future__ import annotations

import numpy as np


class FeatureStats:
    """Running mean and covariance of feature vectors (float64)."""

    def __init__(self, dim: int | None = None):
        self.count = 0
        self.mean = None if dim is None else np.zeros(dim)
        self._m2 = None if dim is None else np.zeros((dim, dim))  # sum of (x - mean)(x - mean)^T

    def update(self, features) -> FeatureStats:
        """Add a batch of features [B, D] (numpy or torch)."""
        x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features,
                       dtype=np.float64)
        if x.ndim != 2 or not len(x):
            raise ValueError(f"features of shape {list(x.shape)}: expected [B, D] with B >= 1")
        if not np.isfinite(x).all():
            raise ValueError("features hold NaN or inf: the detector's output is not usable "
                             "(check the videos' value range and the detector file)")
        batch = FeatureStats()
        batch.count, batch.mean = len(x), x.mean(axis=0)
        centred = x - batch.mean
        batch._m2 = centred.T @ centred
        return self.merge(batch)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another set's statistics into this one (in place; returns self)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self._m2 = other.count, other.mean.copy(), other._m2.copy()
            return self
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"features of width {other.mean.shape[0]} merged into statistics "
                             f"of width {self.mean.shape[0]}: expected one detector for both")
        n = self.count + other.count
        delta = other.mean - self.mean
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.count * other.count / n)
        self.mean = self.mean + delta * (other.count / n)
        self.count = n
        return self

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance [D, D] (numpy.cov's, as the reference FVD code uses)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 videos, the set has {self.count}")
        return self._m2 / (self.count - 1)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self._m2}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = None if state["mean"] is None else np.asarray(state["mean"], np.float64)
        self._m2 = None if state["m2"] is None else np.asarray(state["m2"], np.float64)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (eigh; round-off
    negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for covariances: the product is not symmetric, but
    sqrt(s1) s2 sqrt(s1) is similar to it and symmetric PSD, so its eigenvalues (real,
    clipped at 0) give the trace without a general (Schur) matrix square root."""
    root = _psd_sqrt(sigma1)
    w = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means {list(mu1.shape)}/{list(mu2.shape)} and covariances "
                         f"{list(sigma1.shape)}/{list(sigma2.shape)}: expected [D] and [D, D] "
                         "of one width D")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) \
        - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))  # >= 0 in exact arithmetic; round-off can dip below


def stats_distance(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
