"""Intervals over problems: percentile bootstrap of a mean of per-problem scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its 95% percentile-bootstrap interval (resampling problems)."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}

    def pct(self, digits: int = 1) -> str:
        return f"{100 * self.mean:.{digits}f}% [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"


def bootstrap(scores: torch.Tensor, *, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Estimate:
    """`scores`: one number per problem (e.g. the fraction of its five digits a probe got right,
    averaged over probe seeds); `bootstrap_many` does several rows on the same resamples."""
    return bootstrap_many(scores[None], resamples=resamples, seed=seed, level=level)[0]


def bootstrap_many(
    scores: torch.Tensor, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[Estimate]:
    """Bootstrap every row of `[groups, problems]` with the *same* resampled problem sets, so the
    intervals of groups measured on the same problems are comparable."""
    scores = scores.double()
    n = scores.shape[1]
    if n == 0:
        raise ValueError("no problems to bootstrap over")
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=generator)
    means = scores[:, idx].mean(dim=2)  # [groups, resamples]
    tail = (1 - level) / 2
    low = torch.quantile(means, tail, dim=1)
    high = torch.quantile(means, 1 - tail, dim=1)
    centre = scores.mean(dim=1)
    return [Estimate(float(c), float(lo), float(hi), n) for c, lo, hi in zip(centre, low, high, strict=True)]


def paired_difference(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 1000, seed: int = 0) -> Estimate:
    """Mean of `a - b` over the same problems, with its bootstrap interval (a paired comparison)."""
    return bootstrap(a.double() - b.double(), resamples=resamples, seed=seed)


def difference(a: torch.Tensor, b: torch.Tensor, *, resamples: int = 1000, seed: int = 0) -> Estimate:
    """Mean of `a` minus mean of `b` for two independent samples (each resampled on its own)."""
    generator = torch.Generator().manual_seed(seed)
    a, b = a.double(), b.double()
    ia = torch.randint(0, len(a), (resamples, len(a)), generator=generator)
    ib = torch.randint(0, len(b), (resamples, len(b)), generator=generator)
    diffs = a[ia].mean(1) - b[ib].mean(1)
    low, high = torch.quantile(diffs, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return Estimate(float(a.mean() - b.mean()), low, high, len(a) + len(b))
