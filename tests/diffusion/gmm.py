"""A 2-D Gaussian mixture with closed-form velocity and score under any interpolant, and a sample checker.

Shared by the flow ODE/SDE tests and the Gaussian-diffusion tests; `tests/diffusion/test_samplers.py`
re-exports these names, so both `from tests.diffusion.gmm import ...` and the older import keep working.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from visgen.diffusion.interpolants import Interpolant

__all__ = [
    "COVS",
    "GMMNet",
    "MEANS",
    "NUM_SAMPLES",
    "PathGMMNet",
    "WEIGHTS",
    "check_gmm_samples",
    "gmm_log_density",
    "gmm_marginal_terms",
    "gmm_path_terms",
    "gmm_velocity",
    "iid_mixture_samples",
    "path_coefficients",
]

# 2-D Gaussian mixture: distinct weights, means and full covariances, modes far apart (> 8 stds) so that
# assigning a sample to its most responsible component is unambiguous.
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # (K,)
MEANS = torch.tensor([[-5.0, -3.0], [5.0, -3.0], [0.0, 5.0]], dtype=torch.float64)  # (K, 2)
COVS = torch.tensor(
    [[[1.0, 0.5], [0.5, 0.8]], [[0.6, -0.3], [-0.3, 1.2]], [[1.2, 0.4], [0.4, 0.5]]], dtype=torch.float64
)  # (K, 2, 2)
NUM_SAMPLES = 20_000


def gmm_path_terms(
    x: Tensor,
    alpha: Tensor,
    d_alpha: Tensor,
    noise_var: Tensor,
    noise_cross: Tensor,
    weights: Tensor,
    means: Tensor,
    covs: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-component log(pi_k N(x; a mu_k, S_k)) (K, B), E[v | x_t = x, k] (K, B, 2) and score (K, B, 2).

    x_t = a x + s eps, so x_t | k ~ N(a mu_k, S_k) with S_k = a^2 Sigma_k + s^2 I (`noise_var` = s^2). Jointly
    Gaussian given k: E[x | x_t, k] = mu_k + a Sigma_k S_k^-1 d and E[eps | x_t, k] = s S_k^-1 d with
    d = x_t - a mu_k, so v_k = a' mu_k + (a' a Sigma_k + s s' I) S_k^-1 d (`noise_cross` = s s') and the score
    is -S_k^-1 d. Coefficients have shape (B,) or (1,) (a shared time builds the 2x2 matrices once).
    Components lead (K, B) so the reductions over K run over rows, which is much faster on CPU.
    """
    eye = torch.eye(2, dtype=x.dtype, device=x.device)  # (2, 2)
    a, da = alpha.reshape(1, -1, 1, 1), d_alpha.reshape(1, -1, 1, 1)  # (1, B or 1, 1, 1)
    var, cross = noise_var.reshape(1, -1, 1, 1), noise_cross.reshape(1, -1, 1, 1)  # (1, B or 1, 1, 1)
    cov_t = a**2 * covs[:, None] + var * eye  # (K, B or 1, 2, 2)
    prec = torch.linalg.inv(cov_t)  # (K, B or 1, 2, 2)
    gain = (da * a * covs[:, None] + cross * eye) @ prec  # (K, B or 1, 2, 2)
    d0 = x[:, 0] - alpha * means[:, :1]  # (K, B)
    d1 = x[:, 1] - alpha * means[:, 1:]  # (K, B)
    s0 = prec[..., 0, 0] * d0 + prec[..., 0, 1] * d1  # (K, B): first entry of S_k^{-1} (x - a mu_k)
    s1 = prec[..., 1, 0] * d0 + prec[..., 1, 1] * d1  # (K, B)
    quad = d0 * s0 + d1 * s1  # (K, B)
    log_norm = -0.5 * torch.linalg.slogdet(cov_t)[1] - math.log(2 * math.pi)  # (K, B or 1)
    log_joint = weights.log()[:, None] + log_norm - 0.5 * quad  # (K, B)
    v0 = d_alpha * means[:, :1] + gain[..., 0, 0] * d0 + gain[..., 0, 1] * d1  # (K, B)
    v1 = d_alpha * means[:, 1:] + gain[..., 1, 0] * d0 + gain[..., 1, 1] * d1  # (K, B)
    return log_joint, torch.stack([v0, v1], dim=-1), -torch.stack([s0, s1], dim=-1)  # (K, B), (K, B, 2) x2


def gmm_marginal_terms(
    x: Tensor, t: Tensor, weights: Tensor, means: Tensor, covs: Tensor, noise_power: float = 2.0
) -> tuple[Tensor, Tensor]:
    """Per-component log(pi_k N(x; t mu_k, S_k)) (K, B) and E[x - eps | x_t = x, k] (K, B, 2), linear path.

    S_k = t^2 Sigma_k + (1 - t)^2 I and v_k = mu_k + (t Sigma_k - (1 - t) I) S_k^-1 (x_t - t mu_k) (see
    `gmm_path_terms`). `noise_power` != 2 injects a bug: (1 - t)^p noise variance and -(1 - t)^(p - 1) cross term.
    """
    if bool((t == t[0]).all()):
        t = t[:1]  # shared time: build the per-component 2x2 matrices once, shape (1,)
    s = 1.0 - t  # (B or 1,)
    log_joint, v_k, _ = gmm_path_terms(
        x, t, torch.ones_like(t), s**noise_power, -(s ** (noise_power - 1.0)), weights, means, covs
    )
    return log_joint, v_k  # (K, B), (K, B, 2)


def gmm_velocity(x: Tensor, t: Tensor, noise_power: float = 2.0) -> Tensor:
    """Exact marginal velocity E[x - eps | x_t = x] of the linear path from N(0, I) to the mixture."""
    log_joint, v_k = gmm_marginal_terms(x, t, WEIGHTS, MEANS, COVS, noise_power)  # (K, B), (K, B, 2)
    return (torch.softmax(log_joint, dim=0).unsqueeze(-1) * v_k).sum(0)  # (B, 2)


def gmm_log_density(x: Tensor, t: Tensor) -> Tensor:
    """log p_t(x) of the linear-path marginal at times t, shape (B,)."""
    return torch.logsumexp(gmm_marginal_terms(x, t, WEIGHTS, MEANS, COVS)[0], dim=0)  # (B,)


class GMMNet:
    """Exact velocity 'network'; conditional on y = component index, with y = K the null (mixture) label."""

    def __init__(self, conditional: bool = False, noise_power: float = 2.0) -> None:
        """Store whether labels select components, and an optional injected bug in the noise variance."""
        self.num_classes = WEIGHTS.numel() if conditional else 0
        self.noise_power = noise_power

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity at (x, t): class-conditional component flow, or the full-mixture flow."""
        if self.num_classes == 0:
            return gmm_velocity(x, t, self.noise_power)  # (B, 2)
        log_joint, v_k = gmm_marginal_terms(x, t, WEIGHTS, MEANS, COVS, self.noise_power)  # (K, B), (K, B, 2)
        v_mix = (torch.softmax(log_joint, dim=0).unsqueeze(-1) * v_k).sum(0)  # (B, 2)
        # A single Gaussian component's flow is its own conditional velocity v_k.
        idx = y.clamp(max=self.num_classes - 1).reshape(1, -1, 1).expand(1, -1, 2)  # (1, B, 2)
        v_cond = v_k.gather(0, idx).squeeze(0)  # (B, 2)
        return torch.where((y < self.num_classes)[:, None], v_cond, v_mix)  # (B, 2)


def path_coefficients(interpolant: Interpolant, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha, alpha', sigma^2, sigma sigma') of an interpolant at times t, each shaped like t."""
    sigma = interpolant.sigma(t)
    return interpolant.alpha(t), interpolant.d_alpha(t), sigma**2, sigma * interpolant.d_sigma(t)


class PathGMMNet:
    """Exact network for the mixture under any interpolant, returning its `prediction` (velocity, noise, score,
    or data E[x | x_t] = (sigma v - sigma' x_t) / (alpha' sigma - sigma' alpha), finite on the whole of [0, 1]).

    Conditional on y = component index when `conditional` (y = K is the null label, the whole mixture).
    """

    def __init__(self, interpolant: Interpolant, conditional: bool = False) -> None:
        """Store the path whose exact field this net returns."""
        self.interpolant = interpolant
        self.num_classes = WEIGHTS.numel() if conditional else 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Exact velocity, noise E[eps | x_t] = -sigma s, or score at (x, t), (B, 2)."""
        shared = t[:1] if bool((t == t[0]).all()) else t  # (B or 1,)
        coeffs = path_coefficients(self.interpolant, shared)
        log_joint, v_k, s_k = gmm_path_terms(x, *coeffs, WEIGHTS, MEANS, COVS)  # (K, B), (K, B, 2) x2
        field_k = v_k if self.interpolant.prediction in ("velocity", "data") else s_k  # (K, B, 2)
        out = (torch.softmax(log_joint, dim=0).unsqueeze(-1) * field_k).sum(0)  # (B, 2)
        if self.num_classes > 0:
            idx = y.clamp(max=self.num_classes - 1).reshape(1, -1, 1).expand(1, -1, 2)  # (1, B, 2)
            out = torch.where((y < self.num_classes)[:, None], field_k.gather(0, idx).squeeze(0), out)  # (B, 2)
        if self.interpolant.prediction == "noise":
            out = -self.interpolant.sigma(shared)[:, None] * out  # (B, 2): eps = -sigma s
        if self.interpolant.prediction == "data":
            tb = shared[:, None]  # (B or 1, 1)
            sigma, d_sigma = self.interpolant.sigma(tb), self.interpolant.d_sigma(tb)
            out = (sigma * out - d_sigma * x) / self.interpolant.velocity_data_coefficient(tb)  # (B, 2): E[x | x_t]
        return out


def check_gmm_samples(
    samples: Tensor, weights: Tensor, means: Tensor, covs: Tensor, n_se: float = 4.0, cov_rtol: float = 0.05
) -> tuple[bool, str]:
    """Check samples against a Gaussian mixture; returns (passed, reason).

    Each sample goes to its most responsible component under the true mixture. Per component k: the empirical
    weight must be within `n_se` binomial standard errors sqrt(pi_k (1 - pi_k) / N) of pi_k, each mean
    coordinate within `n_se` standard errors sqrt(Sigma_k,ii / n_k), and the empirical covariance within
    `cov_rtol` relative Frobenius error ||C_k - Sigma_k||_F / ||Sigma_k||_F.
    """
    if not bool(torch.isfinite(samples).all()):
        return False, "non-finite samples"
    n = samples.shape[0]
    log_joint = gmm_marginal_terms(samples, torch.ones(n, dtype=samples.dtype), weights, means, covs)[0]
    assign = log_joint.argmax(dim=0)  # (N,)
    failures = []
    for k in range(weights.numel()):
        pts = samples[assign == k]  # (n_k, D)
        n_k, pi_k = pts.shape[0], float(weights[k])
        if n_k < 10:
            failures.append(f"component {k}: only {n_k} samples")
            continue
        weight_se = math.sqrt(pi_k * (1 - pi_k) / n)
        if abs(n_k / n - pi_k) > n_se * weight_se:
            failures.append(f"component {k}: weight {n_k / n:.4f} vs {pi_k:.4f} (se {weight_se:.4f})")
        mean_se = (covs[k].diagonal() / n_k).sqrt()  # (D,)
        mean_err = (pts.mean(0) - means[k]).abs()  # (D,)
        if bool((mean_err > n_se * mean_se).any()):
            failures.append(f"component {k}: mean error {mean_err.tolist()} vs se {mean_se.tolist()}")
        cov_err = float(torch.linalg.norm(torch.cov(pts.T) - covs[k]) / torch.linalg.norm(covs[k]))
        if cov_err > cov_rtol:
            failures.append(f"component {k}: covariance relative error {cov_err:.4f} > {cov_rtol}")
    return (not failures), "; ".join(failures) or "ok"


def iid_mixture_samples(n: int, seed: int, cov_scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """Exact i.i.d. mixture draws, optionally with inflated covariances or shifted means (for the check)."""
    gen = torch.Generator().manual_seed(seed)
    comp = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)  # (N,)
    chol = torch.linalg.cholesky(COVS * cov_scale)  # (K, 2, 2)
    z = torch.randn(n, 2, 1, generator=gen, dtype=torch.float64)  # (N, 2, 1)
    return MEANS[comp] + shift + (chol[comp] @ z).squeeze(-1)  # (N, 2)
