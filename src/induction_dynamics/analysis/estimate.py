"""Means with their standard errors, from statistics that merge across chunks of samples.

A score that is a mean over prompts, text windows or SGLD chains carries its standard error
into the table (``stderr``): the sample standard deviation (ddof=1) over the sampling units
divided by the square root of their number. ``Moments`` keeps the count, sum and sum of
squares (float64) of the per-unit values, so a set of windows streamed through the model in
chunks gives the same mean and standard error as one pass over all of them. ``ratio`` is the
delta-method standard error of a ratio of means over the same units (the normalised patching
effect). Units that are not independent draws (the heads of one model, the layers of one
forward) are never pooled: each cell has its own estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Estimate:
    """A mean (a number or a tensor of cells) and its standard error (same shape; NaN: none)."""

    value: torch.Tensor | float
    stderr: torch.Tensor | float = math.nan


class Moments:
    """Count, sum and sum of squares of per-unit values, added chunk by chunk (``add``) or merged."""

    def __init__(self):
        self.n = 0
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None

    def add(self, samples: torch.Tensor) -> Moments:
        """Add ``samples`` (n_units, *cell_shape): one row per sampling unit."""
        x = samples.detach().to(torch.float64)
        s, ss = x.sum(0), (x * x).sum(0)
        self.n += x.shape[0]
        self.total = s if self.total is None else self.total + s
        self.total_sq = ss if self.total_sq is None else self.total_sq + ss
        return self

    def merge(self, other: Moments) -> Moments:
        out = Moments()
        parts = [m for m in (self, other) if m.n]
        out.n = sum(m.n for m in parts)
        if parts:
            out.total = sum(m.total for m in parts)
            out.total_sq = sum(m.total_sq for m in parts)
        return out

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    @property
    def stderr(self) -> torch.Tensor:
        if self.n < 2:
            return torch.full_like(self.total, math.nan)
        var = ((self.total_sq - self.total * self.total / self.n) / (self.n - 1)).clamp_min(0.0)
        return (var / self.n).sqrt()

    def estimate(self) -> Estimate:
        return Estimate(self.mean, self.stderr)


def of_samples(samples: torch.Tensor) -> Estimate:
    """The mean over the first axis and its standard error."""
    return Moments().add(samples).estimate()


def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> Estimate:
    """mean(numerator) / mean(denominator) over the same n units (first axis), with the delta
    method's standard error: sd(num_i - r * den_i) / (sqrt(n) |mean(den)|).

    numerator (n, *cells), denominator (n,)."""
    num, den = numerator.detach().double(), denominator.detach().double()
    r = num.mean(0) / den.mean()
    n = num.shape[0]
    if n < 2:
        return Estimate(r, torch.full_like(r, math.nan))
    shape = (n,) + (1,) * (num.dim() - 1)
    resid = num - r * den.view(shape)
    return Estimate(r, resid.std(0, unbiased=True) / (math.sqrt(n) * den.mean().abs()))
