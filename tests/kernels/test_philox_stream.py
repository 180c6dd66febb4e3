"""The counter-based normal stream of `flatlora.kernels.philox` (8 normals per Philox call, Box-Muller on 16-bit
halves) in pure torch, on CPU: its definition, its exact moments and bound, and its distribution. The Triton
kernels' agreement with it is kernel_cases.py's business."""

import math

import pytest
import torch

from flatlora.kernels import philox

N16 = 65536


def _definition(key: int, offsets: list[int]) -> list[float]:
    """z(key, o) straight from the module docstring, in float64 (math), from philox4x32's integers."""
    out = []
    for o in offsets:
        c, lane = o >> 3, o & 7
        w = int(philox.philox4x32(key, torch.tensor([c]))[lane >> 1])
        u1, u2 = ((w & 0xFFFF) + 0.5) / N16, ((w >> 16) + 0.5) / N16
        r, th = math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2 - math.pi
        out.append(r * (math.cos(th) if lane % 2 == 0 else math.sin(th)))
    return out


def test_the_stream_is_its_definition():
    """float32 normals8/normal_at against the float64 definition: theta's float32 rounding (<= 2^-22 near
    pi, plus float32(pi)'s 9e-8) times r <= 4.86, and the float32 functions: well under 3e-6."""
    key = 2**63 + 12345
    offsets = list(range(16)) + [8 * 2**33 + 3, 8 * (2**32 - 1) + 7, 123456789]
    ref = torch.tensor(_definition(key, offsets), dtype=torch.float64)
    got = philox.normal_at(key, torch.tensor(offsets)).double()
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-6)
    eight = philox.normals8(key, torch.tensor([0, 1]))  # lanes in order: 8 c + l
    assert eight.shape == (2, 8) and torch.equal(eight.reshape(-1), philox.normal_at(key, torch.arange(16)))


def test_exact_second_moment_and_bound():
    """Over the 2^16 equally likely values of each half: E[z^2] = E[r^2] / 2 (the 2^16 angles have
    E[cos^2] = E[sin^2] = 1/2 exactly: sum of cos 2 theta = 0) = E[-ln u1], a finite sum with the closed form
    ln 2^16 - (lnGamma(2^16 + 1/2) - lnGamma(1/2)) / 2^16; |z| <= r = sqrt(-2 ln u1) <= sqrt(-2 ln 2^-17)."""
    h = torch.arange(N16, dtype=torch.float64)
    u = (h + 0.5) / N16
    exact = float(-u.log().mean())
    closed = math.log(N16) - (math.lgamma(N16 + 0.5) - math.lgamma(0.5)) / N16
    assert abs(exact - closed) < 1e-12 and abs(exact - philox.EXPECTED_SQUARE) < 1e-12
    assert 4e-6 < 1 - exact < 6e-6  # 1 - 5.29e-6: the midpoint rule's deficit at ln's singularity
    theta = 2 * math.pi * u - math.pi
    assert abs(float(torch.cos(2 * theta).sum())) < 1e-9 and abs(float(torch.cos(theta).sum())) < 1e-9
    assert philox.R_MAX == pytest.approx(math.sqrt(-2 * math.log(0.5 / N16)), rel=1e-15)
    assert philox.R_MAX == pytest.approx(4.854585887492170, abs=1e-12)
    assert math.erfc(philox.R_MAX / math.sqrt(2)) == pytest.approx(1.206e-6, rel=1e-3)  # P(|z| > r_max), N(0, 1)
    # The float32 transform over all 2^16 values of h1 (h2 = 0): its r^2 = z0^2 + z1^2 averages to the
    # exact E[r^2] within float32 rounding, and never exceeds r_max.
    cos, sin = philox._halves_to_normals(torch.arange(N16))
    r2 = cos.double() ** 2 + sin.double() ** 2
    assert abs(float(r2.mean()) / 2 - exact) < 1e-8
    assert float(r2.max().sqrt()) <= philox.R_MAX * (1 + 2**-23)


def test_stream_distribution():
    """2^20 normals of one key: mean, variance and E[z^4] within 5 standard errors of N(0, 1)'s (the
    truncation's effect, ~1e-5 on each, is far below), |z| <= r_max, and a KS test against N(0, 1) (a fixed
    key, so deterministic: p = 0.021 for this one; 2^-16 steps in the CDF are far below KS's resolution,
    ~1.3e-3 at 2^20)."""
    z = philox.standard_normal_rows(2**40 + 7, 1024, 1024, "cpu").reshape(-1).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96 / n)  # Var z^4 = 105 - 9 under N(0, 1)
    assert float(z.abs().max()) <= philox.R_MAX * (1 + 2**-23)
    stats = pytest.importorskip("scipy.stats")
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
