"""
Tests, in the order of the files they test: diffusion.py (the schedules, then every sampler against the exact
answer on Gaussian data), unet.py, data.py (every layout, on tiny fake datasets), train.py and sample.py end
to end on a tiny model of 16x16 fake faces, and the docs. CPU only, whatever the machine has; no CelebA needed.

    python -m pytest -q test_all.py
"""
import contextlib
import functools
import glob
import json
import math
import shutil
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import autoencoder
import budget
import control
import data
import diffusion as D
import sample
import settings
import text as texts
import train
import unet
import util

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec")  # torchvision 0.29 deprecates its codecs; they still work
CPU = ["--device", "cpu"]  # the tests assert CPU semantics (bit-exact resume, fp32, CPU generators) on any machine
# tiny models: two threads at most, on any machine (16 threads on 16 cores made the suite slower), in this process
# and the scripts it starts; and no measuring of idle cores at each start
os.environ["OMP_NUM_THREADS"] = str(min(2, torch.get_num_threads()))
torch.set_num_threads(min(2, torch.get_num_threads()))


# -----------------------------------------------------------------------------
# diffusion.py: the schedules and the forward process


def test_linear_schedule_endpoint():
    d = D.GaussianDiffusion(1000, "linear")
    assert d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    # other T keep the same end point through the 1000/T scaling
    assert D.GaussianDiffusion(250, "linear").alphas_cumprod[-1].item() == pytest.approx(4e-5, rel=0.5)


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    d = D.GaussianDiffusion(T, "cosine")
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)  # index t is the paper's t+1
    uncapped = d.betas < 0.999
    assert uncapped[: T - 5].all()
    torch.testing.assert_close(d.alphas_cumprod[uncapped], expected[uncapped], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", D.SCHEDULES)
@pytest.mark.parametrize("T", [10, 1000])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(schedule, T):
    a = D.GaussianDiffusion(T, schedule).alphas_cumprod
    assert ((a > 0) & (a < 1)).all() and (a.diff() < 0).all()


def test_posterior_matches_bayes():
    # q(x_{t-1} | x_t, x_0) from eqs. 6-7 against the Gaussian product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0)
    d = D.GaussianDiffusion(100, "linear")
    for t in (1, 50, 99):
        a_t, ab_prev = d.alphas[t], d.alphas_cumprod[t - 1]
        prec = a_t / d.betas[t] + 1 / (1 - ab_prev)  # precision of x_{t-1}
        assert d.posterior_variance[t].item() == pytest.approx((1 / prec).item(), rel=1e-10)
        assert d.posterior_mean_coef2[t].item() == pytest.approx((a_t.sqrt() / d.betas[t] / prec).item(), rel=1e-10)
        assert d.posterior_mean_coef1[t].item() == pytest.approx((ab_prev.sqrt() / (1 - ab_prev) / prec).item(), rel=1e-10)
    assert d.posterior_variance[0] == 0 and d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_q_sample_matches_repeated_one_step_kernel():
    d = D.GaussianDiffusion(50, "linear")
    g = torch.Generator().manual_seed(0)
    n, t = 200_000, 37
    x0 = torch.full((n,), 0.7, dtype=torch.float64)
    x = x0.clone()
    for s in range(t + 1):  # x_{s+1} = sqrt(1 - beta) x_s + sqrt(beta) z, t+1 times
        x = (1 - d.betas[s]).sqrt() * x + d.betas[s].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    direct = d.q_sample(x0, torch.full((n,), t), torch.randn(n, generator=g, dtype=torch.float64))
    mean, var = d.sqrt_alphas_cumprod[t] * 0.7, 1 - d.alphas_cumprod[t]
    se = math.sqrt(var / n)
    for samples in (x, direct):
        assert abs(samples.mean() - mean) < 5 * se
        assert abs(samples.var() - var) < 5 * var * math.sqrt(2 / n)


def test_predict_x0_eps_roundtrip_for_every_objective():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, torch.randn(8, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    for objective in D.OBJECTIVES:
        d = D.GaussianDiffusion(1000, "cosine", objective)
        xt = d.q_sample(x0, t, eps)
        a = d._at(d.alphas_cumprod, t, x0)
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective]
        x0_hat, eps_hat = d.predict_x0_eps(out, xt, t)
        torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=1e-3)
        # clipping bounds x0_hat only: eps_hat stays the one the model output implies
        x0_c, eps_c = d.predict_x0_eps(out * 40, xt, t, clip=True)
        x0_u, eps_u = d.predict_x0_eps(out * 40, xt, t)
        assert x0_c.abs().max() <= 1 and x0_u.abs().max() > 1
        torch.testing.assert_close(x0_c, x0_u.clamp(-1, 1)), torch.testing.assert_close(eps_c, eps_u)


def test_min_snr_weighting():
    d = D.GaussianDiffusion(1000, "linear", "eps", min_snr_gamma=5.0)
    x0 = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([10, 900])  # high SNR (weight 5/snr) and low SNR (weight 1)
    model = lambda x, t: torch.zeros_like(x)
    noise = torch.ones_like(x0)
    loss = d.training_losses(model, x0, t, noise)
    snr = d.snr[t]
    torch.testing.assert_close(loss.double(), (5.0 / snr).clamp(max=1.0), rtol=1e-5, atol=0)


# -----------------------------------------------------------------------------
# diffusion.py: every sampler against the exact answer on Gaussian data
# x0 ~ N(mu, s^2 I) has a closed-form optimal denoiser, so it is an exact "model": each sampler's output moments
# can be compared with those of its own discrete chain, propagated in float64 from the papers' coefficients


MU, S = 0.3, 0.5

def oracle(d, mu=MU, s=S):
    """The exact E[target | x_t] for data N(mu, s^2), as a "model" for d.objective."""
    def model(x, t):
        a = d.alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        v = a * s * s + 1 - a  # Var(x_t)
        r = x.double() - a.sqrt() * mu  # x_t - E[x_t]
        eps = (1 - a).sqrt() / v * r  # E[eps | x_t]
        x0 = mu + a.sqrt() * s * s / v * r  # E[x0 | x_t]
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[d.objective]
        return out.to(x.dtype)
    return model


def chain_moments(d, sampler, steps=None, eta=0.0, var_type="beta", mu=MU, s=S):
    """Exact mean and variance after the discrete chain, propagated in float64 with coefficients written
    here from the papers (independently of diffusion.py): every step maps x to c1 x + c0 + sigma z."""
    ab = d.alphas_cumprod.double()
    def x0_coef(a):  # E[x0 | x] = mu + k (x - sqrt(a) mu) = k x + (mu - k sqrt(a) mu)
        k = a.sqrt() * s * s / (a * s * s + 1 - a)
        return k, mu - k * a.sqrt() * mu
    m, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    if sampler == "ddpm":
        for t in reversed(range(d.T)):
            a, a_prev, beta = ab[t], (ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)), 1 - ab[t] / (ab[t - 1] if t > 0 else 1)
            k, b = x0_coef(a)
            # mu_tilde = sqrt(a_prev) beta / (1 - a) x0 + sqrt(alpha) (1 - a_prev) / (1 - a) x_t
            c_x0, c_xt = a_prev.sqrt() * beta / (1 - a), (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
            c1, c0 = c_x0 * k + c_xt, c_x0 * b
            sig2 = 0.0 if t == 0 else (beta if var_type == "beta" else beta * (1 - a_prev) / (1 - a))
            m, var = c1 * m + c0, c1 * c1 * var + sig2
    else:
        taus = torch.linspace(0, d.T - 1, steps).round().long().unique().tolist()
        for i in reversed(range(len(taus))):
            a = ab[taus[i]]
            a_prev = ab[taus[i - 1]] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
            k, b = x0_coef(a)
            # eps_hat = (x - sqrt(a) x0_hat) / sqrt(1 - a);  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sig^2) eps + sig z
            sig2 = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
            c_dir = (1 - a_prev - sig2).sqrt() / (1 - a).sqrt()
            c1 = a_prev.sqrt() * k + c_dir * (1 - a.sqrt() * k)
            c0 = a_prev.sqrt() * b - c_dir * a.sqrt() * b
            m, var = c1 * m + c0, c1 * c1 * var + (sig2 if i > 0 else 0.0)
    return m.item(), var.sqrt().item()


def run_sampler(d, sampler, steps=None, eta=0.0, var_type="beta", n=8192):
    g = torch.Generator().manual_seed(1234)
    x = d.sample(oracle(d), (n, 1, 2, 2), sampler, steps=steps or 50, eta=eta, generator=g, clip=False, var_type=var_type)
    return x.double().mean().item(), x.double().std().item(), x.numel()


SAMPLER_CASES = [("ddpm", None, 0.0, "beta"), ("ddpm", None, 0.0, "posterior"),
                 ("ddim", 50, 0.0, "beta"), ("ddim", 50, 1.0, "beta"), ("ddim", 20, 0.0, "beta"), ("ddim", 20, 1.0, "beta")]

# How far the exact discrete chain's std may sit from the data's s. DDPM with all T steps is exact up
# to O(1/T); DDIM with S steps is a first-order discretisation whose error shrinks like 1/S (see
# test_ddim_converges_to_the_data and REPORT.md: for s = 0.5 the std is 0.472 at 50 steps, eta 0).
STD_TOL = {("ddpm", None): 0.005, ("ddim", 1000): 0.005, ("ddim", 50): 0.06, ("ddim", 20): 0.12}

def check_against_chain(d, sampler, steps, eta, var_type):
    mean, std, n = run_sampler(d, sampler, steps, eta, var_type)
    m_exact, s_exact = chain_moments(d, sampler, steps, eta, var_type)
    # The samples are correlated only within an image (4 values, one chain each), so count images
    # conservatively: standard errors of mean and std with n/4 independent draws, 5 sigma.
    n_eff = n / 4
    assert abs(mean - m_exact) < 5 * s_exact / math.sqrt(n_eff), (mean, m_exact)
    assert abs(std - s_exact) < 5 * s_exact / math.sqrt(2 * n_eff), (std, s_exact)
    # and the chain itself lands on the data distribution N(MU, S^2)
    assert m_exact == pytest.approx(MU, abs=0.002)
    assert s_exact == pytest.approx(S, abs=STD_TOL[sampler, steps])


@pytest.mark.parametrize("objective", D.OBJECTIVES)
@pytest.mark.parametrize("sampler,steps,eta,var_type", SAMPLER_CASES)
def test_samplers_recover_gaussian_data(objective, sampler, steps, eta, var_type):
    check_against_chain(D.GaussianDiffusion(1000, "linear", objective), sampler, steps, eta, var_type)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_converges_to_the_data(eta):
    d = D.GaussianDiffusion(1000, "linear", "v")
    check_against_chain(d, "ddim", 1000, eta, "beta")  # all steps: as exact as DDPM
    errors = [abs(chain_moments(d, "ddim", S, eta)[1] - S_) for S, S_ in ((10, S), (20, S), (50, S), (200, S))]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 10


def test_oracle_check_catches_a_wrong_coefficient():
    d = D.GaussianDiffusion(1000, "linear")
    d.posterior_mean_coef2 = d.posterior_mean_coef2 * 1.002  # a 0.2% error in one coefficient
    mean, std, n = run_sampler(d, "ddpm")
    m_exact, s_exact = chain_moments(D.GaussianDiffusion(1000, "linear"), "ddpm")
    n_eff = n / 4
    assert abs(mean - m_exact) > 5 * s_exact / math.sqrt(n_eff) or abs(std - s_exact) > 5 * s_exact / math.sqrt(2 * n_eff)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_every_sampler_reports_each_step_to_its_callback(sampler):
    d, frames = D.GaussianDiffusion(100, "linear"), []
    x = d.sample(oracle(d), (4, 1, 2, 2), sampler, steps=10, generator=torch.Generator().manual_seed(0),
                 callback=lambda t, x_t, x0: frames.append((t, x_t, x0)))
    ts = [t for t, _, _ in frames]
    assert ts == d.timesteps(sampler, 10) and ts[0] == 99 and ts[-1] == 0 and torch.equal(frames[-1][1], x)
    assert len(ts) == (100 if sampler == "ddpm" else 10)


def test_the_library_default_sampler_is_the_scripts_default():
    # sample.py, train.py's grids and diffusion.sample all use one default: DDIM, 20 steps, eta 1
    import inspect
    p = inspect.signature(D.GaussianDiffusion.sample).parameters
    assert (p["sampler"].default, p["steps"].default, p["eta"].default) == (D.DEFAULT_SAMPLER, D.DEFAULT_STEPS, D.DEFAULT_ETA) == ("ddim", 20, 1.0)


def dpm_chain(d, steps, mu=MU, s=S):
    ab = d.alphas_cumprod.double()
    lam = 0.5 * torch.log(ab / (1 - ab))  # lambda_t = log(alpha_t / sigma_t)
    ts = d.dpm_timesteps(steps).tolist()
    c, b, prev, h_prev = 1.0, 0.0, None, None
    for i, t_s in enumerate(ts):
        a = ab[t_s].item()
        k = math.sqrt(a) * s * s / (a * s * s + 1 - a)  # E[x0 | x] = k x + mu - k sqrt(a) mu
        x0 = (k * c, k * b + mu - k * math.sqrt(a) * mu)
        if i == len(ts) - 1:
            return x0  # the last step lands on x0_hat
        t = ts[i + 1]
        h = (lam[t] - lam[t_s]).item()
        if prev is None:
            D = x0
        else:
            r = h_prev / h
            D = tuple((1 + 1 / (2 * r)) * p - 1 / (2 * r) * q for p, q in zip(x0, prev))
        f, g = math.sqrt((1 - ab[t].item()) / (1 - a)), math.sqrt(ab[t].item()) * (1 - math.exp(-h))
        c, b = f * c + g * D[0], f * b + g * D[1]
        prev, h_prev = x0, h


@pytest.mark.parametrize("objective", D.OBJECTIVES)
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_matches_its_exact_chain(objective, steps):
    d = D.GaussianDiffusion(1000, "linear", objective)
    c, b = dpm_chain(d, steps)
    mean, std, n = run_sampler(d, "dpm++", steps)
    n_eff = n / 4
    assert abs(mean - b) < 5 * abs(c) / math.sqrt(n_eff) and abs(std - abs(c)) < 5 * abs(c) / math.sqrt(2 * n_eff)
    # pathwise: the very same x_T goes to c x_T + b, up to float32 rounding
    x_T = torch.linspace(-3, 3, 64).view(16, 1, 2, 2)
    x = d.sample(oracle(d), x_T.shape, "dpm++", steps=steps, x_T=x_T, clip=False)
    assert (x.double() - (c * x_T.double() + b)).abs().max() < 1e-4
    assert abs(c) == pytest.approx(S, abs=0.02) and b == pytest.approx(MU, abs=0.002)  # and lands on the data


def test_dpm_solver_check_catches_a_wrong_coefficient():
    d = D.GaussianDiffusion(1000, "linear")
    c, b = dpm_chain(d, 20)
    d.lambdas = d.lambdas * 1.01  # every step size h 1% off
    x_T = torch.linspace(-3, 3, 64).view(16, 1, 2, 2)
    x = d.sample(oracle(d), x_T.shape, "dpm++", steps=20, x_T=x_T, clip=False)
    assert (x.double() - (c * x_T.double() + b)).abs().max() > 1e-3


def sde_dpm_path(d, x_T, steps, generator, mu=MU, s=S):
    """SDE-DPM-Solver++(2M) on the oracle, one path per entry of x_T, with the noise drawn as the sampler
    draws it; written again from the solver's update. -> x_0 (float64) and the exact (mean, std) of x_0."""
    ab = d.alphas_cumprod.double()
    lam = 0.5 * torch.log(ab / (1 - ab))
    ts = d.dpm_timesteps(steps).tolist()
    x, prev, x_prev, h_prev = x_T.double(), None, None, None  # prev: (k, b) of the previous step
    m, C = torch.zeros(2, dtype=torch.float64), torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64))  # of (x_i, x_{i-1})
    for i, t_s in enumerate(ts):
        a = ab[t_s].item()
        k = math.sqrt(a) * s * s / (a * s * s + 1 - a)
        b = mu - k * math.sqrt(a) * mu  # E[x0 | x] = k x + b
        if i == len(ts) - 1:
            return k * x + b, (k * m[0].item() + b, abs(k) * math.sqrt(C[0, 0].item()))
        t = ts[i + 1]
        h = (lam[t] - lam[t_s]).item()
        f = math.sqrt((1 - ab[t].item()) / (1 - a)) * math.exp(-h)  # (sigma_t / sigma_s) e^{-h}
        g = math.sqrt(ab[t].item()) * (1 - math.exp(-2 * h))  # alpha_t (1 - e^{-2h})
        n = math.sqrt(1 - ab[t].item()) * math.sqrt(1 - math.exp(-2 * h))  # sigma_t sqrt(1 - e^{-2h})
        w = 0.0 if prev is None else 1 / (2 * h_prev / h)  # 1 / (2 r)
        P, Q, c = f + g * (1 + w) * k, (-g * w * prev[0] if prev else 0.0), g * ((1 + w) * b - (w * prev[1] if prev else 0.0))
        x_prev, x = x, P * x + (Q * x_prev if prev else 0.0) + c + n * torch.randn(x.shape, generator=generator).double()
        M = torch.tensor([[P, Q], [1.0, 0.0]], dtype=torch.float64)
        m, C = M @ m + torch.tensor([c, 0.0], dtype=torch.float64), M @ C @ M.T + torch.diag(torch.tensor([n * n, 0.0], dtype=torch.float64))
        prev, h_prev = (k, b), h


@pytest.mark.parametrize("objective", D.OBJECTIVES)
@pytest.mark.parametrize("steps", [10, 20])
def test_sde_dpm_solver_matches_its_exact_chain(objective, steps):
    d = D.GaussianDiffusion(1000, "linear", objective)
    x_T = torch.randn(8192, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = d.sample(oracle(d), x_T.shape, "dpm++sde", steps=steps, x_T=x_T, clip=False, generator=torch.Generator().manual_seed(1))
    path, (mean, std) = sde_dpm_path(d, x_T, steps, torch.Generator().manual_seed(1))
    assert (x.double() - path).abs().max() < 1e-4  # pathwise, with the same noise
    n_eff = x.numel() / 4
    assert abs(x.double().mean() - mean) < 5 * std / math.sqrt(n_eff) and abs(x.double().std() - std) < 5 * std / math.sqrt(2 * n_eff)
    assert mean == pytest.approx(MU, abs=0.002) and std == pytest.approx(S, abs=0.03)  # near the data: 0.510 and 0.517
    d.lambdas = d.lambdas * 1.002  # and a wrong step size is caught
    x = d.sample(oracle(d), x_T.shape, "dpm++sde", steps=steps, x_T=x_T, clip=False, generator=torch.Generator().manual_seed(1))
    assert (x.double() - path).abs().max() > 1e-3


def test_dpm_timesteps_are_uniform_in_log_snr():
    d = D.GaussianDiffusion(1000, "linear")
    for steps in (10, 20):
        ts = d.dpm_timesteps(steps)
        assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0 and (ts.diff() < 0).all()
        target = torch.linspace(d.lambdas[999].item(), d.lambdas[0].item(), steps, dtype=torch.float64)
        assert (d.lambdas[ts] - target).abs().max() < 0.2  # rounding to integer t; lambda moves ~0.4 per t near t = 0
    assert d.dpm_timesteps(20, "time").tolist() == d.ddim_timesteps(20).flip(0).tolist()


def test_order_of_accuracy_second_for_dpm_solver_first_for_ddim():
    # The exact probability-flow ODE maps x at t=999 to m_0 + (v_0 / v_999) (x - m_999), with m_t, v_t the
    # Gaussian marginal's mean and std; both samplers then land on x0_hat at t = 0. Their error in the final
    # std must fall ~4x (DPM-Solver++(2M), second order) and ~2x (DDIM, first order) per doubling of steps.
    d = D.GaussianDiffusion(1000, "linear")
    ab = d.alphas_cumprod.double()
    v = lambda a: math.sqrt(a * S * S + 1 - a)
    k0 = math.sqrt(ab[0]) * S * S / v(ab[0]) ** 2
    exact = k0 * v(ab[0]) / v(ab[999])
    x_T = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1)
    def error(sampler, steps):
        x = d.sample(oracle(d), x_T.shape, sampler, steps=steps, eta=0.0, x_T=x_T, clip=False).double().flatten()
        return abs((x[1] - x[0]).item() / 2 - exact)  # the slope of the affine map: the final std
    for sampler, steps, lo, hi in [("dpm++", (20, 40, 80), 3.0, 5.0), ("ddim", (20, 40, 80), 1.7, 2.3)]:
        errs = [error(sampler, n) for n in steps]
        ratios = [errs[i] / errs[i + 1] for i in range(len(errs) - 1)]
        assert all(lo < r < hi for r in ratios), (sampler, errs, ratios)
    assert error("dpm++", 20) < error("ddim", 20) / 5


MU_C, S_C, MU_U, S_U = 0.6, 0.3, 0.0, 0.6

def conditional_oracle(d, calls=None):
    """model(x, t, attrs): the exact E[eps | x_t] under N(MU_C, S_C^2) where attrs is +1, under N(MU_U, S_U^2) where 0."""
    def eps(x, a, mu, s):
        return (1 - a).sqrt() / (a * s * s + 1 - a) * (x.double() - a.sqrt() * mu)
    def model(x, t, attrs=None):
        if calls is not None:
            calls.append(x.shape[0])
        a = d.alphas_cumprod[t].view(-1, *[1] * (x.dim() - 1))
        given = (attrs if attrs is not None else torch.zeros(x.shape[0], 1)).view(-1, *[1] * (x.dim() - 1)) != 0
        return torch.where(given, eps(x, a, MU_C, S_C), eps(x, a, MU_U, S_U)).to(x.dtype)
    return model


def guided_chain(d, steps, eta, W):
    """Exact mean and std after DDIM ([DDIM] eq. 12) with the guided eps, propagated in float64:
    eps_g(x) = k x + b with k = sqrt(1-a) (W / v_c + (1-W) / v_u), b = -sqrt(1-a) sqrt(a) (W mu_c / v_c + (1-W) mu_u / v_u),
    v = a s^2 + 1 - a; x0 = (x - sqrt(1-a) eps_g) / sqrt(a); x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sig^2) eps_g + sig z."""
    ab = d.alphas_cumprod.double()
    taus = torch.linspace(0, d.T - 1, steps).round().long().unique().tolist()
    m, var = 0.0, 1.0
    for i in reversed(range(len(taus))):
        a = ab[taus[i]].item()
        a_prev = ab[taus[i - 1]].item() if i > 0 else 1.0
        v_c, v_u = a * S_C ** 2 + 1 - a, a * S_U ** 2 + 1 - a
        k = math.sqrt(1 - a) * (W / v_c + (1 - W) / v_u)
        b = -math.sqrt(1 - a) * math.sqrt(a) * (W * MU_C / v_c + (1 - W) * MU_U / v_u)
        sig2 = eta ** 2 * (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        c_dir = math.sqrt(max(1 - a_prev - sig2, 0))
        c1 = math.sqrt(a_prev / a) * (1 - math.sqrt(1 - a) * k) + c_dir * k
        c0 = -math.sqrt(a_prev / a) * math.sqrt(1 - a) * b + c_dir * b
        m, var = c1 * m + c0, c1 * c1 * var + (sig2 if i > 0 else 0.0)
    return m, math.sqrt(var)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("W", [0.0, 1.0, 3.0])
def test_guidance_matches_its_exact_chain(eta, W):
    d, calls = D.GaussianDiffusion(1000, "linear"), []
    n, steps = 8192, 50
    x = d.sample(D.guided(conditional_oracle(d, calls), torch.ones(1), W), (n, 1, 2, 2), "ddim", steps, eta,
                 torch.Generator().manual_seed(0), clip=False).double()
    assert calls == [n if W == 1 else 2 * n] * steps  # one forward per step; both halves in one batch when W != 1
    m, s = guided_chain(d, steps, eta, W)
    n_eff = n / 4
    assert abs(x.mean() - m) < 5 * s / math.sqrt(n_eff) and abs(x.std() - s) < 5 * s / math.sqrt(2 * n_eff), (x.mean(), x.std(), m, s)
    if W == 0:  # the unconditional data, and W = 1 the conditional data (up to DDIM's 50-step error, see STD_TOL)
        assert m == pytest.approx(MU_U, abs=0.01) and s == pytest.approx(S_U, abs=0.08)
    elif W == 1:
        assert m == pytest.approx(MU_C, abs=0.01) and s == pytest.approx(S_C, abs=0.06)
    else:  # W > 1 extrapolates away from the unconditional data: a mean beyond MU_C, a narrower spread
        assert m > MU_C + 0.05 and s < S_C
        wrong = guided_chain(d, steps, eta, 1.1 * W)  # a 10% error in the weight is caught
        assert abs(x.mean() - wrong[0]) > 5 * s / math.sqrt(n_eff) or abs(x.std() - wrong[1]) > 5 * s / math.sqrt(2 * n_eff)


MU_2D, S1, S2, RHO = (0.2, -0.1), 0.5, 0.6, 0.9

def oracle_2d(d):
    """The exact eps model for x_0 ~ N(MU_2D, Cov) in 2-D: E[x0 | x_t] = mu + sqrt(a) Cov (a Cov + (1-a) I)^-1 (x_t - sqrt(a) mu)."""
    mu = torch.tensor(MU_2D, dtype=torch.float64)
    cov = torch.tensor([[S1 * S1, RHO * S1 * S2], [RHO * S1 * S2, S2 * S2]], dtype=torch.float64)
    def model(x, t):
        a = d.alphas_cumprod[t[0]].double()
        gain = a.sqrt() * cov @ torch.linalg.inv(a * cov + (1 - a) * torch.eye(2, dtype=torch.float64))
        x0 = mu + (x.double() - a.sqrt() * mu) @ gain.T
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)
    return model


def test_repaint_approaches_the_exact_conditional_as_resampling_grows():
    d, c = D.GaussianDiffusion(1000, "linear"), 0.7
    want_mean, want_std = MU_2D[1] + RHO * S2 / S1 * (c - MU_2D[0]), S2 * math.sqrt(1 - RHO ** 2)  # 0.44, 0.26
    known, mask = torch.tensor([c, 0.0]).expand(2000, 2).clone(), torch.tensor([1.0, 0.0])
    errors = []
    for passes in (1, 3, 10):
        g = torch.Generator().manual_seed(0)
        x = d.repaint(oracle_2d(d), torch.randn(known.shape, generator=g), known, mask, 200, 10, passes, g, clip=False)
        assert torch.equal(x[:, 0], known[:, 0])  # the known part is the input, exactly
        errors.append((abs(x[:, 1].mean().item() - want_mean), abs(x[:, 1].std().item() - want_std)))
    # no resampling is far off (it keeps much of the marginal N(-0.1, 0.6^2)); each resampling pass moves it closer
    assert errors[0][0] > 0.15 and errors[0][0] > errors[1][0] > errors[2][0], errors
    assert errors[2][0] < 0.06 and errors[2][1] < 0.03, errors  # standard error of the mean: 0.006


def test_repaint_path_goes_down_and_jumps_back():
    path = D.GaussianDiffusion.repaint_path(25, 5, 3)
    assert path[0] == 24 and path[-1] == -1 and all(abs(q - p) == 1 for p, q in zip(path, path[1:]))
    downs = sum(q < p for p, q in zip(path, path[1:]))
    assert downs == 25 + 4 * 2 * 5  # jumps at positions 0, 5, 10, 15 (20 + 5 would pass the top), two more passes each
    assert D.GaussianDiffusion.repaint_path(25, 5, 1) == list(range(24, -2, -1))  # one pass: plain ancestral sampling


@pytest.mark.parametrize("sampler,steps,eta", [("ddpm", None, 0.0), ("ddim", 50, 1.0), ("dpm++", 20, 0.0)])
def test_sdedit_ends_and_keeps_the_data_distribution(sampler, steps, eta):
    # strength 0 returns the input; strength 1 is plain sampling from the same noise; in between (0.3), an input
    # drawn from the data, noised to t_0 by q, is distributed as x_t0, so the reverse process from t_0 must
    # give the data distribution back (on the oracle, whose denoiser is exact).
    d = D.GaussianDiffusion(1000, "linear")
    g = torch.Generator().manual_seed(0)
    x_init = MU + S * torch.randn(4096, 1, 2, 2, generator=g, dtype=torch.float64).float()
    noise = torch.randn(x_init.shape, generator=g)
    kw = dict(sampler=sampler, steps=steps or 50, eta=eta, clip=False)
    assert torch.equal(d.sdedit(oracle(d), x_init, 0.0, noise, **kw), x_init)
    torch.testing.assert_close(d.sdedit(oracle(d), x_init, 1.0, noise, generator=torch.Generator().manual_seed(1), **kw),
                               d.sample(oracle(d), x_init.shape, x_T=noise, generator=torch.Generator().manual_seed(1), **kw))
    x = d.sdedit(oracle(d), x_init, 0.3, noise, generator=torch.Generator().manual_seed(1), **kw).double()
    n_eff = x.numel() / 4
    assert abs(x.mean() - MU) < 5 * S / math.sqrt(n_eff) and abs(x.std() - S) < 0.03
    # how much of the input survives: a deterministic reverse path keeps corr(x_t0, x_init) exactly, a stochastic
    # one less, but not nothing
    a = d.alphas_cumprod[299].item()
    kept = math.sqrt(a) * S / math.sqrt(a * S * S + 1 - a)
    corr = torch.corrcoef(torch.stack([x.flatten(), x_init.double().flatten()]))[0, 1].item()
    assert abs(corr - kept) < 0.03 if sampler == "dpm++" else 0.05 < corr < kept
    with pytest.raises(ValueError, match="strength"):
        d.sdedit(oracle(d), x_init, 1.5, noise, **kw)


def test_slerp_keeps_the_ends_and_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    b = b * a.norm() / b.norm()
    z = D.slerp(a, b, torch.linspace(0, 1, 7))
    torch.testing.assert_close(z[0], a[0]), torch.testing.assert_close(z[-1], b[0])
    torch.testing.assert_close(z.flatten(1).norm(dim=1), a.norm().expand(7))  # a straight line would dip to ~0.71


def discretised_gaussian_data(n, mu=MU, s=S, seed=0):
    """n values of N(mu, s^2) put on the 256-level grid of [-1, 1] (outer bins to +-inf), and the exact
    -log2 P(x) of each: the data's true discrete negative log-likelihood."""
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (grid[:-1] + grid[1:]) / 2, torch.tensor([math.inf], dtype=torch.float64)])
    cdf = torch.special.ndtr((edges - mu) / s)
    p = cdf[1:] - cdf[:-1]  # (256,) the mass of each bin
    idx = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return grid[idx].float(), -torch.log2(p[idx])


def bound_gap(d, n=4096):
    """-> (mean over images of bound - exact NLL in bits/dim, its standard error), with the optimal denoiser."""
    x0, nll = discretised_gaussian_data(n)
    bpd = d.bits_per_dim(oracle(d), x0.view(n // 4, 1, 2, 2), torch.Generator().manual_seed(1))
    gap = bpd["total"] - nll.view(n // 4, 4).mean(1)
    return gap.mean().item(), gap.std().item() / math.sqrt(len(gap))


def test_bits_per_dim_bounds_the_exact_discrete_nll(monkeypatch):
    # The bound is >= the model's NLL >= the data's entropy, for any model; with the exact denoiser at T=1000
    # it sits 0.46 bits/dim above: what DDPM's fixed variance sigma_t^2 = beta_t costs where the true reverse
    # variance is near beta_tilde_t (small t), plus the decoder's bin at t = 0.
    d = D.GaussianDiffusion(1000, "linear")
    gap, se = bound_gap(d)
    assert -3 * se < gap < 0.6, (gap, se)
    # a wrong term is caught: the decoder with half-width bins, a KL without its log-variance ratio
    def half_width_bins(x, mean, log_std):
        upper, lower = (x - mean + 0.5 / 255) * torch.exp(-log_std), (x - mean - 0.5 / 255) * torch.exp(-log_std)
        return torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    monkeypatch.setattr(D, "discretized_gaussian_log_likelihood", half_width_bins)
    assert bound_gap(d)[0] > 0.6
    monkeypatch.undo()
    monkeypatch.setattr(D, "normal_kl", lambda m1, l1, m2, l2: 0.5 * (-1 + torch.exp(l1 - l2) + (m1 - m2) ** 2 * torch.exp(-l2)))
    gap, se = bound_gap(d)
    assert not -3 * se < gap < 0.6, gap


def test_bits_per_dim_estimate_is_unbiased():
    d = D.GaussianDiffusion(100, "linear")  # few terms: the exact sum is cheap
    x0, _ = discretised_gaussian_data(4096)
    x0 = x0.view(1024, 1, 2, 2)
    exact = d.bits_per_dim(oracle(d), x0, torch.Generator().manual_seed(1))["total"]
    est = d.bits_per_dim(oracle(d), x0, torch.Generator().manual_seed(2), t_samples=8)["total"]
    diff = est - exact
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 1e-3
    # stratified (one t per slice of 1..T-1) spreads less than the same number of uniform draws of t
    g = torch.Generator().manual_seed(3)
    uniform = 99 * sum(d.vb_term_bpd(oracle(d), x0, torch.randint(1, 100, (1024,), generator=g), torch.randn(x0.shape, generator=g))
                       for _ in range(8)) / 8
    uniform = uniform + d.prior_bpd(x0) + d.bits_per_dim(oracle(d), x0, g, t_samples=1)["decoder"]
    assert (est - exact).std() < 0.5 * (uniform - exact).std()  # 0.3 measured


# -----------------------------------------------------------------------------
# unet.py


def tiny_config(size=16, **kw):
    return unet.preset(size, **{**dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,), dropout=0.0), **kw})


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_preset_shapes(size):
    cfg = unet.preset(size)
    assert cfg.ch == 128 and cfg.image_size == size
    with torch.device("meta"):  # the full preset, shapes only (no memory, no compute)
        x = torch.randn(2, 3, size, size)
        assert unet.UNet(cfg)(x, torch.tensor([3, 999])).shape == x.shape
    m = unet.UNet(unet.preset(size, ch=8 if size > 64 else 16))  # and really computed, at reduced width
    x = torch.randn(1, 3, size, size)
    assert m(x, torch.tensor([3])).shape == x.shape


def test_one_timestep_is_refused_by_the_math_too():
    with pytest.raises(ValueError, match="at least 2"):
        D.GaussianDiffusion(1)


def test_channels_last_gives_every_4d_weight_its_strides_1x1_kernels_too():
    m = unet.UNet(tiny_config())
    budget.to_channels_last(m)
    weights = [p for p in m.parameters() if p.dim() == 4]
    assert any(p.shape[2:] == (1, 1) for p in weights)  # the skip connections' 1x1 convs
    for p in weights:
        o, i, h, w = p.shape
        assert p.stride() == (i * h * w, 1, w * i, i), (p.shape, p.stride())


@pytest.mark.parametrize("busy,cores,processes,threads", [(0.1, 2, 1, 2), (1.0, 2, 1, 1), (0.8, 16, 1, 15), (3.0, 16, 4, 3)])
def test_threads_are_the_idle_cores(monkeypatch, busy, cores, processes, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(budget.CpuLoad, "others", lambda self: busy)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    chosen, said = [], []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    assert budget.set_threads(torch.device("cpu"), processes, said.append) == threads and chosen == [threads]
    assert bool(said) == (threads * processes < cores)  # a choice below the cores is said, with how to override it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    chosen.clear()
    budget.set_threads(torch.device("cpu"), processes, said.append)
    assert chosen == []  # the variable decides


def test_presets_parameter_counts_match_readme():
    readme = open(os.path.join(HERE, "README.md")).read()
    for size in unet.PRESETS:
        channels = 4 if size < 32 else 3  # the presets below 32 are for latents of 4 channels
        n = unet.UNet(unet.preset(size, in_channels=channels)).num_params()
        assert f"| {size} | {n:,} |" in readme, f"README parameter table is stale for {size}: {n:,}"
    assert unet.UNet(unet.preset(64)).num_params() == pytest.approx(78.7e6, rel=0.01)  # DDIM's CelebA-64 network


def test_indivisible_size_is_rejected():
    with pytest.raises(ValueError, match="not divisible by 16") as e:
        unet.UNet(unet.preset(72))
    assert e.value.args[0] == "image_size"  # the field at fault: each script names its own flag for it


def test_group_norm_groups_divide_any_width():
    # 32 groups of >= 4 channels where the width allows (DDPM's), and always a number of groups that divides it
    assert [unet.norm(c).num_groups for c in (32, 64, 96, 128, 256)] == [8, 16, 8, 32, 32]
    assert all(c % unet.norm(c).num_groups == 0 for c in range(1, 520))
    unet.UNet(unet.UNetConfig(image_size=8, ch=3, ch_mult=(1, 3), num_res_blocks=1, attn_res=()))  # widths 3, 9


def perturbed(model):
    # zero-initialised output layers make a fresh network constant; nudge every weight to test the wiring
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_output_depends_on_t():
    m = perturbed(unet.UNet(tiny_config())).eval()
    x = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(m(x, torch.tensor([1, 1])), m(x, torch.tensor([500, 500])), atol=1e-4)


@pytest.mark.parametrize("film", [False, True])
def test_conditional_unet_with_the_condition_dropped_is_its_unconditional_path(film):
    m = perturbed(unet.UNet(tiny_config(attrs=("Smiling", "Male", "Young"), attr_film=film))).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3, 40, 300, 999])
    attrs = torch.tensor([[1.0, 0, -1], [0, 1, 0], [-1, -1, -1], [0, 0, 0]])
    assert torch.equal(m(x, t), m(x, t, torch.zeros(4, 3)))  # every attribute unspecified adds exactly nothing
    out = m(x, t, attrs)
    assert not torch.allclose(out[:3], m(x[:3], t[:3]), atol=1e-4)
    torch.testing.assert_close(out[3:], m(x[3:], t[3:]))
    torch.testing.assert_close(D.guided(m, attrs, 0.0)(x, t), m(x, t))  # W = 0: unconditional; W = 1: conditional
    torch.testing.assert_close(D.guided(m, attrs, 1.0)(x, t), out)
    torch.testing.assert_close(D.guided(m, attrs, 3.0)(x, t), m(x, t) + 3 * (out - m(x, t)), atol=1e-5, rtol=1e-4)
    # an unconditional model keeps exactly its parameters: a checkpoint's model_args from before `attrs` existed still load
    plain = unet.UNet(tiny_config())
    old_args = {k: v for k, v in unet.config_dict(plain.cfg).items() if k != "attrs"}
    old_args = {k: v for k, v in old_args.items() if k != "attr_film"}
    unet.UNet(unet.config_from_dict(old_args)).load_state_dict(plain.state_dict())
    extra = set(m.state_dict()) - set(plain.state_dict())
    assert extra == {"attr_emb.weight"} | ({k for k in m.state_dict() if ".film." in k} if film else set()), extra


@pytest.mark.parametrize("attrs", [(), ("Smiling", "Male")])
def test_every_parameter_gets_a_gradient(attrs):
    m = unet.UNet(tiny_config(attn_res=(16, 8), attrs=attrs, attr_film=bool(attrs)))
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    x, t, a = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([[1.0, -1.0], [-1.0, 0.0]])
    for _ in range(3):  # zero-initialised layers (conv_out, then each block's conv2) pass gradient on one step later
        opt.zero_grad()
        (m(x, t, a if attrs else None) - x).pow(2).mean().backward()
        opt.step()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def saved_per_image(m, d=None):
    """Bytes autograd keeps per image for a training step of model m, with its activation checkpointing as set."""
    return budget.saved_bytes_per_image(m, D.Denoising.probe_losses, (3, m.cfg.image_size, m.cfg.image_size),
                                        m.grad_checkpoint, torch.device("cpu"), contextlib.nullcontext(), "fix")


def test_activation_checkpointing_gives_the_same_gradients_with_less_saved_memory():
    m = perturbed(unet.UNet(tiny_config(attn_res=(16, 8), dropout=0.2)))
    d = D.GaussianDiffusion(100)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 50, 99])
    grads, saved = [], []
    for on in (False, True):
        m.grad_checkpoint = on
        torch.manual_seed(0)  # the same dropout masks; checkpoint replays the RNG on recomputation
        m.zero_grad()
        d.training_losses(m, x, t, x.flip(0)).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        saved.append(saved_per_image(m, d))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert 0 < saved[1] < saved[0] / 2, saved


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_attention_can_use_a_flash_kernel_in_either_memory_format(fmt):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = unet.Attention(128, 64)
    torch.nn.init.normal_(attn.proj.weight, std=0.02)
    x = torch.randn(2, 128, 8, 8).to(memory_format=fmt)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # flash only: raises when q, k, v do not qualify
        y = attn(x.requires_grad_())
        y.sum().backward()
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(y, attn(x), rtol=1e-4, atol=1e-5)


def test_tiny_unet_learns_and_samples_near_training_images():
    # Four fixed 16x16 images; the x0 target and a decaying learning rate make 300 CPU steps enough to
    # memorise them. The exact trajectory differs between CPUs (AVX2 vs AVX-512 kernels, core counts), so
    # the bounds hold with a wide margin: over seeds 0-3 on 1 and 2 threads, 12 to 15 of 16 stochastic
    # (eta 1) samples landed within MSE 0.05 of a training image, median 0.0025 to 0.004, and the last
    # losses were 0.30 to 0.36 of the first (the 32-channel net: 13 to 15, 0.0015 to 0.004, 0.29, at 2.3x
    # the time). Deterministic DDIM is less forgiving of an imperfect model (6 to 10 of 16 without the
    # decay). An untrained model gives about 0.16 (the zero image), noise about 0.65.
    torch.manual_seed(0)
    images = torch.stack([torch.linspace(-1, 1, 16).view(1, 1, 16).expand(3, 16, 16),
                          -torch.linspace(-1, 1, 16).view(1, 16, 1).expand(3, 16, 16),
                          torch.zeros(3, 16, 16).index_fill_(2, torch.arange(4, 12), 0.8) - 0.4,
                          torch.randn(3, 16, 16).clamp(-1, 1)])
    d = D.GaussianDiffusion(100, "cosine", "x0")
    m = unet.UNet(tiny_config())
    opt = torch.optim.AdamW(m.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(300):
        for group in opt.param_groups:  # cosine decay to 0
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / 300))
        x0 = images[torch.randint(0, 4, (16,), generator=g)]
        t = torch.randint(0, 100, (16,), generator=g)
        loss = d.training_losses(m, x0, t, torch.randn(x0.shape, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # x0-loss at high noise cannot go to 0 (the best guess there is the mean image): compare to the start
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:10]) / 10, (losses[:10], losses[-50:])
    m.eval()
    x = d.sample(m, (16, 3, 16, 16), "ddim", steps=25, eta=1.0, generator=torch.Generator().manual_seed(1), clip=True)
    dist = ((x[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4)).min(dim=1).values  # MSE to the nearest training image
    noise_dist = ((torch.randn(16, 1, 3, 16, 16).clamp(-1, 1) - images[None]) ** 2).mean(dim=(2, 3, 4)).min(dim=1).values
    assert (dist < 0.05).sum() >= 8 and dist.median() < 0.02 and noise_dist.min() > 0.5, (dist, noise_dist)


# -----------------------------------------------------------------------------
# data.py: tiny fake datasets in every layout


ATTRS = ["Smiling", "Male", "Young"]

def face(seed, w=178, h=218):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def write_jpeg(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.io.write_jpeg(img, path, quality=95)


def make_celeba(root, layout, n=12, listed_missing=3, corrupt=True):
    """A CelebA-like tree: n images on disk (plus listed-but-missing ones), partition 8/2/2, 3 attributes.
    Image 1 is grayscale, image 2 RGBA (PNG renamed to .jpg is not used: they are real JPEG/PNG files)."""
    names = [f"{i:06d}.jpg" for i in range(1, n + listed_missing + 1)]
    if layout == "torchvision":
        base = os.path.join(root, "celeba")
        img_dir = os.path.join(base, "img_align_celeba")
    else:
        base, img_dir = root, os.path.join(root, "img_align_celeba", "img_align_celeba")
    os.makedirs(img_dir, exist_ok=True)
    for i, name in enumerate(names[:n]):
        p = os.path.join(img_dir, name)
        if i == 1:  # grayscale JPEG
            Image.fromarray(face(i)[0].numpy(), "L").save(p, "JPEG")
        elif i == 2:  # RGBA, stored as PNG data under a .jpg name: decoders go by content
            Image.fromarray(face(i).permute(1, 2, 0).numpy(), "RGB").convert("RGBA").save(p, "PNG")
        elif i == 3 and corrupt:  # truncated JPEG
            write_jpeg(p, face(i))
            blob = open(p, "rb").read()
            open(p, "wb").write(blob[: len(blob) // 3])
        else:
            write_jpeg(p, face(i))
    part = [0] * 8 + [1] * 2 + [2] * 2 + [0] * listed_missing
    attrs = [[1 if (i + j) % 2 else -1 for j in range(len(ATTRS))] for i in range(len(names))]
    if layout == "torchvision":
        with open(os.path.join(base, "list_eval_partition.txt"), "w") as f:
            f.writelines(f"{nm} {p}\n" for nm, p in zip(names, part))
        with open(os.path.join(base, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{len(names)}\n{' '.join(ATTRS)} \n")
            f.writelines(f"{nm} " + " ".join(f"{v:2d}" for v in a) + "\n" for nm, a in zip(names, attrs))
    else:
        with open(os.path.join(base, "list_eval_partition.csv"), "w") as f:
            f.write("image_id,partition\n" + "".join(f"{nm},{p}\n" for nm, p in zip(names, part)))
        with open(os.path.join(base, "list_attr_celeba.csv"), "w") as f:
            f.write("image_id," + ",".join(ATTRS) + "\n" + "".join(f"{nm}," + ",".join(map(str, a)) + "\n" for nm, a in zip(names, attrs)))
    return names, attrs


def make_folder(root, n=10, size=(40, 30)):
    for i in range(n):
        sub = os.path.join(root, "a" if i % 2 else "b")
        os.makedirs(sub, exist_ok=True)
        img = face(100 + i, *size)
        ext = [".jpg", ".png", ".webp", ".jpeg"][i % 4]
        pil = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB")
        if i == 4:
            pil = pil.convert("CMYK")  # saved as a CMYK JPEG
        pil.save(os.path.join(sub, f"img{i}{ext}"))
    Image.fromarray(face(7, 30, 30)[0].numpy().astype("uint16") * 257).save(os.path.join(root, "gray16.png"))  # 16-bit
    open(os.path.join(root, "notes.txt"), "w").write("not an image")


def quiet(*a, **k):
    pass


def run_cli(*args, timeout=240):
    """Run a command in a fresh process; train.py and sample.py on the CPU unless --device is given."""
    if args[0] in ("train.py", "sample.py") and "--device" not in args:
        args = (*args, *CPU)
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)


def main_error(capsys, main, args):
    """Run a script's main() in this process; -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(args)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def cli(capsys, main, args):
    """A script's main() run in this process, as run_cli runs it in another (faster): -> its exit code, stdout
    and stderr."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def one_line_error(r, *words):
    """The command failed with exit code 2 and one line on stderr that holds every word."""
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    for w in words:
        assert w in r.stderr, (w, r.stderr)


@pytest.mark.parametrize("layout", ["torchvision", "kaggle"])
def test_celeba_layouts_splits_attributes_and_missing(tmp_path, layout):
    names, attrs = make_celeba(str(tmp_path), layout)
    msgs = []
    for path in ([tmp_path, tmp_path / "celeba"] if layout == "torchvision" else [tmp_path]):
        sel = data.select(str(path), "train", msgs.append)
        assert sel["layout"] == layout
    assert "12 of 15 listed images found" in msgs[0]
    assert [os.path.basename(f) for f in data.select(str(tmp_path), "valid", quiet)["files"]] == names[8:10]
    assert len(data.select(str(tmp_path), "test", quiet)["files"]) == 2
    assert len(data.select(str(tmp_path), "all", quiet)["files"]) == 12
    d = data.load(str(tmp_path), 16, "train", cache_dir=str(tmp_path / "cache"), log=msgs.append)
    # the truncated image 000004.jpg is skipped with a warning naming it; grayscale and RGBA are converted
    assert any("000004.jpg" in m for m in msgs)
    assert d["images"].shape == (7, 3, 16, 16) and d["images"].dtype == torch.uint8
    assert d["attr_names"] == ATTRS
    kept = [names.index(os.path.basename(f)) for f in d["files"]]
    assert d["attrs"].tolist() == [[int(v > 0) for v in attrs[i]] for i in kept]
    # --attrs picks columns, in the annotation file's order, and refuses names the file does not have
    c = data.load(str(tmp_path), 16, "train", cache_dir=str(tmp_path / "cache"), log=quiet, attrs="Young,Smiling")
    assert c["cond_names"] == ["Smiling", "Young"] and torch.equal(c["cond"], d["attrs"][:, [0, 2]])
    assert data.load(str(tmp_path), 16, "train", cache_dir=str(tmp_path / "cache"), log=quiet, attrs="all")["cond_names"] == ATTRS
    with pytest.raises(data.DataError, match="no attribute 'Bald'; choose 'all' or some of Smiling,Male,Young"):
        data.load(str(tmp_path), 16, "train", cache_dir=str(tmp_path / "cache"), log=quiet, attrs="Smiling,Bald")


def test_folder_layout_formats_and_holdout(tmp_path):
    make_folder(str(tmp_path))
    sel = data.select(str(tmp_path), "all", quiet)
    assert sel["layout"] == "folder" and len(sel["files"]) == 11 and sel["attrs"] is None
    train, valid = data.select(str(tmp_path), "train", quiet)["files"], data.select(str(tmp_path), "valid", quiet)["files"]
    assert len(valid) == 1 and not set(train) & set(valid) and len(train) + len(valid) == 11
    msgs = []
    d = data.load(str(tmp_path), 8, "all", cache_dir=str(tmp_path / "cache"), log=msgs.append)
    assert d["images"].shape == (11, 3, 8, 8), msgs  # CMYK, 16-bit grayscale, webp, png all decoded
    assert not any(m.startswith("warning") for m in msgs), msgs
    gray = d["images"][[os.path.basename(f) for f in d["files"]].index("gray16.png")]
    assert torch.equal(gray[0], gray[1]) and gray.float().std() > 10  # converted, not clipped to white


def test_celeba_crop_centres_the_marker():
    img = torch.zeros(3, 218, 178, dtype=torch.uint8)
    img[:, 121 - 4:121 + 4, 89 - 4:89 + 4] = 255  # a marker at (x=89, y=121)
    assert data.crop_box(178, 218, "auto") == (25, 57, 128, 128)
    left, top, w, h = data.crop_box(178, 218, "auto")
    out = torchvision.transforms.v2.functional.resize(img[:, top:top + h, left:left + w], [32, 32], antialias=True)
    ys, xs = torch.nonzero(out[0] > 60, as_tuple=True)
    assert abs(ys.float().mean() - 15.5) < 0.6 and abs(xs.float().mean() - 15.5) < 0.6
    assert data.crop_box(300, 200, "auto") == (50, 0, 200, 200)  # other images: centre square
    assert data.crop_box(300, 200, "none") == (0, 0, 300, 200)


def test_cache_reuse_and_invalidation(tmp_path):
    make_folder(str(tmp_path / "imgs"), n=6)
    cache = str(tmp_path / "cache")
    msgs = []
    d1 = data.load(str(tmp_path / "imgs"), 8, "all", cache_dir=cache, log=msgs.append)
    msgs.clear()
    d2 = data.load(str(tmp_path / "imgs"), 8, "all", cache_dir=cache, log=msgs.append)
    assert any("from cache" in m for m in msgs) and torch.equal(d1["images"], d2["images"])
    # a different size or crop is another cache file
    assert data.cache_file(cache, str(tmp_path / "imgs"), "all", "auto", 8) != data.cache_file(cache, str(tmp_path / "imgs"), "all", "none", 8)
    # the data changed: stale
    Image.fromarray(face(99, 20, 20).permute(1, 2, 0).numpy()).save(str(tmp_path / "imgs" / "new.png"))
    msgs.clear()
    d3 = data.load(str(tmp_path / "imgs"), 8, "all", cache_dir=cache, log=msgs.append)
    assert any("stale" in m for m in msgs) and len(d3["files"]) == len(d1["files"]) + 1
    # a truncated cache file: rebuilt
    path = d3["cache"]
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    msgs.clear()
    d4 = data.load(str(tmp_path / "imgs"), 8, "all", cache_dir=cache, log=msgs.append)
    assert any("unreadable" in m for m in msgs) and torch.equal(d4["images"], d3["images"])
    # image bytes overwritten in place (same size, so the file still loads): the checksum catches it
    blob = bytearray(open(path, "rb").read())
    at = blob.find(d4["images"][2].numpy().tobytes())  # where one image's pixels sit in the file
    assert at > 0
    blob[at:at + 64] = bytes(64)
    open(path, "wb").write(bytes(blob))
    msgs.clear()
    d5 = data.load(str(tmp_path / "imgs"), 8, "all", cache_dir=cache, log=msgs.append)
    assert any("corrupt" in m and "checksum" in m for m in msgs) and torch.equal(d5["images"], d3["images"])


def test_data_errors(tmp_path):
    with pytest.raises(data.DataError, match="no such folder"):
        data.select(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no images found"):
        data.select(str(tmp_path / "empty"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(data.DataError, match="no images found"):
        data.select(str(tmp_path / "text"))
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(data.DataError, match="is a file"):
        data.select(str(tmp_path / "file.jpg"))
    # annotations that belong to other images
    make_celeba(str(tmp_path / "mismatch"), "torchvision", n=4, listed_missing=0, corrupt=False)
    img_dir = tmp_path / "mismatch" / "celeba" / "img_align_celeba"
    for f in os.listdir(img_dir):
        os.rename(img_dir / f, img_dir / ("x" + f))
    with pytest.raises(data.DataError, match="do not belong to these images"):
        data.select(str(tmp_path / "mismatch"))
    # an attribute file missing rows that the partition lists
    make_celeba(str(tmp_path / "short"), "kaggle", n=4, listed_missing=0, corrupt=False)
    lines = open(tmp_path / "short" / "list_attr_celeba.csv").read().splitlines()
    (tmp_path / "short" / "list_attr_celeba.csv").write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(data.DataError, match="has no row for"):
        data.select(str(tmp_path / "short"))
    # all images unreadable
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"\xff\xd8\xffnot a jpeg")
    with pytest.raises(data.DataError, match="could be read"):
        data.load(str(tmp_path / "bad"), 8, "all", cache_dir=str(tmp_path / "cache"), log=quiet)


def test_many_corrupt_files_warn_a_bounded_number_of_lines(tmp_path):
    make_folder(str(tmp_path), n=2)
    for i in range(data.MAX_WARNINGS + 5):
        (tmp_path / f"bad{i:02d}.jpg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    msgs = []
    d = data.load(str(tmp_path), 8, "all", cache_dir=str(tmp_path / "cache"), log=msgs.append)
    warnings = [m for m in msgs if m.startswith("warning")]
    assert len(warnings) == data.MAX_WARNINGS + 1 and "5 more" in warnings[-1] and len(d["files"]) == 3
    assert all(".cpp" not in w and "/__w/" not in w for w in warnings) and "bad00.jpg: RuntimeError" in warnings[0]
    assert not any("upscaled" in m for m in msgs)  # 40x30 images at 8x8: nothing to say
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")  # far smaller than the size asked for: said
    msgs.clear()
    data.load(str(tmp_path), 8, "all", cache_dir=str(tmp_path / "cache"), log=msgs.append)
    assert any(m.startswith("note: 1 image was upscaled more than twice to 8x8") and "tiny.png" in m for m in msgs), msgs


@pytest.mark.parametrize("error,message", [
    (RuntimeError("Too many users have viewed or downloaded this file recently"), "Google Drive refused"),
    (RuntimeError("download failed"), "download failed"),
])
def test_download_failure_explains_manual_route(tmp_path, monkeypatch, error, message):
    def fail(root, *a, **k):
        os.makedirs(os.path.join(root, "celeba"))  # what torchvision creates before it fetches anything
        raise error
    monkeypatch.setattr(torchvision.datasets, "CelebA", fail)
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: object())  # as if gdown were installed
    with pytest.raises(data.DataError, match=message) as e:
        data.download(str(tmp_path / "data"), quiet)
    assert "Kaggle" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "data")  # the empty folders the attempt made are gone


def test_download_tells_no_network_from_missing_gdown(tmp_path, monkeypatch):
    import socket
    import urllib.error
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataError, match="needs the gdown package.*pip install gdown"):
        data.download(str(tmp_path), quiet)
    def offline(*a, **k):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr(torchvision.datasets, "CelebA", offline)
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: object())
    (tmp_path / "keep").mkdir()  # a folder the user had: kept, even when empty
    with pytest.raises(data.DataError, match="no network") as e:
        data.download(str(tmp_path / "keep"), quiet)
    assert "gdown" not in str(e.value) and os.path.isdir(tmp_path / "keep")


def test_batches_are_the_same_for_any_world_size():
    images = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8)
    one = data.Batches(images, 8, "cpu", seed=3)
    two = [data.Batches(images, 8, "cpu", seed=3, rank=r, world=2) for r in range(2)]
    for step in (0, 4, 5, 11):  # 5 steps per epoch: crosses epochs
        g = lambda: torch.Generator().manual_seed(step)
        full = one.get(step, g())[0]
        assert full.shape == (8, 3, 4, 4) and full.min() >= -1 and full.max() <= 1
        torch.testing.assert_close(torch.cat([b.get(step, g())[0] for b in two]), full)
    for batch, world in ((7, 2), (64, 1)):  # train.py refuses both before it decodes
        with pytest.raises(ValueError, match="equal shards"):
            data.Batches(images, batch, "cpu", seed=0, world=world)


def test_unwritable_cache_fails_before_decoding(tmp_path):
    make_folder(str(tmp_path / "imgs"), n=2)
    (tmp_path / "file").write_text("x")
    msgs = []
    with pytest.raises(util.WriteError, match="cache folder .*cannot write there"):
        data.load(str(tmp_path / "imgs"), 8, "all", cache_dir=str(tmp_path / "file" / "cache"), log=msgs.append)
    assert not any("decoding" in m for m in msgs)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the workers in /proc")
def test_interrupting_the_decode_prints_one_line(tmp_path):
    big = torch.randint(0, 256, (3, 1200, 1200), dtype=torch.uint8)
    torchvision.io.write_jpeg(big, str(tmp_path / "a.jpg"), quality=98)
    for i in range(600):  # links: many slow images at no disk cost, so the decode lasts seconds on any machine
        os.link(tmp_path / "a.jpg", tmp_path / f"b{i:03d}.jpg")
    def decode_and(interrupt):
        p = subprocess.Popen([sys.executable, "-u", "data.py", "--data", str(tmp_path), "--cache-dir", str(tmp_path / "cache")],
                             cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal starts it, even
                             # if an earlier test left SIGINT ignored here (a child inherits that, and Python then never raises KeyboardInterrupt)
        for line in p.stdout:
            if "decoding on" in line and ": 1/" in line:  # the pool is up and working
                interrupt(p.pid)
                break
        out, err = p.communicate(timeout=60)
        assert err.count("\n") == 1 and "Traceback" not in out + err and not os.path.exists(tmp_path / "cache"), (out, err)  # nothing left
        return p.returncode, err
    code, err = decode_and(lambda pid: os.killpg(pid, signal.SIGINT))  # Ctrl-C in a terminal: every process of the group
    assert code == 130 and "interrupted" in err
    def kill_a_worker(pid):  # as the kernel's out-of-memory killer would
        workers = open(f"/proc/{pid}/task/{pid}/children").read().split()
        os.kill(int(workers[0]), signal.SIGKILL)
    code, err = decode_and(kill_a_worker)
    assert code == 2 and "a decoding process died" in err


def test_data_cli_summary_preview_export_and_errors(tmp_path, capsys):
    make_celeba(str(tmp_path / "c"), "torchvision")
    r = cli(capsys, data.main, ["--data", str(tmp_path / "c"), "--size", "16", "--cache-dir", str(tmp_path / "cache"),
                "--preview", str(tmp_path / "p.png"), "--export", str(tmp_path / "exp")])
    assert r.returncode == 0, r.stderr
    assert "layout:  torchvision" in r.stdout and "train 8" in r.stdout and "img/s" in r.stdout
    assert os.path.exists(tmp_path / "p.png") and len(os.listdir(tmp_path / "exp")) == 7
    exported = torchvision.io.read_image(str(tmp_path / "exp" / "000001.png"))
    assert exported.shape == (3, 16, 16)
    r = cli(capsys, data.main, ["--data", str(tmp_path / "missing")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr and "Traceback" not in r.stderr


def test_progress_says_the_rate_and_eta_once_they_mean_something(monkeypatch):
    now, lines = [0.0], []
    monkeypatch.setattr(util, "time", SimpleNamespace(time=lambda: now[0]))
    p = util.Progress(1000, "data: decoding", "images", lines.append, every=5, first=True)
    p(1)  # the first image: work has begun, but a rate from it would say hours
    now[0] = 6.0
    p(600)
    now[0] = 6.5
    p(700)  # within 5 s of the last line: nothing
    now[0] = 8.0
    p(1000)
    assert lines[0] == "data: decoding: 1/1,000 images" and "ETA 0m04s" in lines[1] and "100.0 images/s" in lines[1]
    assert len(lines) == 3 and "ETA" not in lines[2] and "125.0 images/s" in lines[2]
    quiet = util.Progress(10, "sample grid", "image-steps", lines.append, last=False)
    quiet(10)  # a short phase says nothing at its end: the line after it does
    assert len(lines) == 3


def test_a_folder_of_one_image_trains_without_a_validation_split(tmp_path, capsys):
    (tmp_path / "one").mkdir()
    Image.fromarray(face(1, 20, 20).permute(1, 2, 0).numpy()).save(str(tmp_path / "one" / "a.png"))
    with pytest.raises(data.DataError, match="no valid images .a folder of one image keeps it for training.$"):
        data.load(str(tmp_path / "one"), 8, "valid", cache_dir=str(tmp_path / "cache"), log=quiet)
    train.main(["--data", str(tmp_path / "one"), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                *TINY, "--batch-size", "1", "--max-steps", "1", "--eval-every", "1"])
    out, err = capsys.readouterr()
    assert "no validation loss: data folder" in out and "split" not in out + err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_exporting_onto_a_full_disk_fails_and_leaves_no_empty_file(tmp_path):
    make_folder(str(tmp_path / "imgs"), n=6)
    out, args = tmp_path / "exp", ["data.py", "--data", str(tmp_path / "imgs"), "--size", "16", "--cache-dir", str(tmp_path / "c"),
                                   "--preview", ""]
    data.main(args[1:])  # the cache, written without a limit
    r = limited_run(300, *args, "--export", str(out))
    one_line_error(r, "cannot write", str(out), "--export")
    assert all(os.path.getsize(out / f) > 0 for f in os.listdir(out)) and not [f for f in os.listdir(out) if ".tmp" in f]


# -----------------------------------------------------------------------------
# train.py: a tiny model on 16x16 fake faces, end to end


TINY = ["--size", "16", "--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "8", "--timesteps", "50",
        "--batch-size", "4", "--warmup", "2", "--log-every", "1", "--sample-every", "0", "--eval-every", "0",
        "--ckpt-every", "0", *CPU, "--seed", "5"]

@pytest.fixture(autouse=True)
def cpu_unless_asked(monkeypatch):
    """A script run in this process without --device uses the CPU, even where a GPU is visible."""
    pick = budget.pick_device
    monkeypatch.setattr(budget, "pick_device", lambda name=None, *a, **k: pick(name or "cpu", *a, **k))


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    for i in range(24):
        Image.fromarray(face(200 + i, 20, 20).permute(1, 2, 0).numpy()).save(str(root / f"{i:03d}.png"))
    return str(root)


def stage_of(args):
    """What train.py's setup decides the flags `args` train (a latent run's autoencoder: the default config)."""
    first = autoencoder.Pixels()
    if args.latents:
        first = autoencoder.FirstStage(autoencoder.AutoencoderConfig(), None, None, {})
    if args.autoencoder:
        return train.AutoencoderStage(first)
    if args.control:  # a control run on a base of the --size preset
        return train.ControlStage(first, unet.config_dict(unet.preset(args.size)), None, "")
    if args.hint_concat:
        return train.HintStage(first)
    return train.DDPMStage(first)


def train_args(faces, out, *extra):
    return ["--data", faces, "--cache-dir", os.path.join(os.path.dirname(out), "cache"), "--out", out, *TINY, *extra]


def states(path):
    c = torch.load(path, weights_only=True)
    return c["model"], c["ema"], c["optimizer"]["state"], c["step"]


def assert_same_training_state(a, b, step):
    """The runs in folders a and b stopped at `step` with equal weights, EMA weights and optimizer state."""
    (ma, ea, oa, sa), (mb, eb, ob, sb) = states(os.path.join(a, "ckpt.pt")), states(os.path.join(b, "ckpt.pt"))
    assert sa == sb == step
    for k in mb:
        assert torch.equal(ma[k], mb[k]) and torch.equal(ea[k], eb[k]), k
    for i in ob:
        assert all(torch.equal(oa[i][k], ob[i][k]) for k in ob[i])


def log_rows(out):
    import csv
    with open(os.path.join(out, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(faces, tmp_path_factory):
    """A tiny unconditional run of 3 steps with an evaluation (its log.csv has both losses): what the sample.py
    tests draw from. -> its --out folder."""
    out = str(tmp_path_factory.mktemp("tiny") / "run")
    train.main(train_args(faces, out, "--max-steps", "3", "--eval-every", "2"))
    return out


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    """A tiny model conditioned on Young and Smiling, on a fake CelebA root. -> (its --out folder, the root)."""
    root = tmp_path_factory.mktemp("cond")
    make_celeba(str(root / "c"), "torchvision", n=12, listed_missing=0, corrupt=False)
    out = str(root / "run")
    train.main(["--data", str(root / "c"), "--cache-dir", str(root / "cache"), *TINY[:-2], "--seed", "3", "--attrs", "Young,Smiling",
                "--max-steps", "2", "--out", out, "--eval-every", "2"])
    return out, str(root / "c")


def test_training_prints_progress_and_writes_grid_log_and_checkpoint(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    r = cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "3", "--sample-every", "3", "--eval-every", "3",
                                        "--sample-steps", "2", "--sample-n", "4")])
    assert r.returncode == 0, r.stderr
    assert "device cpu" in r.stdout and "seed 5" in r.stdout and "img/s" in r.stdout and "ETA" in r.stdout
    assert "takes the" not in r.stdout  # 16 has a preset of its own; a size without one says which it took:
    args, given = settings.make_parser().parse(["--size", "24", "--attn-res", "12", "--ch-mult", "1,2"])
    said = []
    train.check_args(args, given, SimpleNamespace(world=1, say=said.append), None, stage_of(args))
    assert said == ["model: --size 24 takes the --size 16 preset (--ch, --ch-mult, --num-res-blocks, --attn-res, --dropout override it)"]
    assert Image.open(os.path.join(out, "samples_0000003.png")).size == (2 * 18 + 2, 2 * 18 + 2)  # 4 faces, 2 x 2
    log = open(os.path.join(out, "log.csv")).read().splitlines()
    assert log[0].startswith("step,epoch,loss,val_loss") and len(log) >= 5
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["size"] == 16 and not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_conditional_training_takes_the_annotation_files_attributes(cond_run, faces, tmp_path, capsys):
    out, root = cond_run
    ckpt = util.load_checkpoint(out)
    assert ckpt["model_args"]["attrs"] == ["Smiling", "Young"]  # the annotation file's order, not the flag's
    assert [r for r in log_rows(out) if r["val_loss"]]  # evaluated with every attribute given
    base = ["--cache-dir", str(tmp_path / "cache"), *TINY, "--out", str(tmp_path / "x")]
    for data_path, attrs, words in [(faces, "Smiling", "no attribute labels"), (root, "Smiling,Nose", "no attribute 'Nose'")]:
        code, _, err = main_error(capsys, train.main, [*base, "--data", data_path, "--attrs", attrs])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(tmp_path / "x")  # refused before decoding


def test_condition_dropout_rates():
    g = torch.Generator().manual_seed(0)
    attrs = torch.randint(0, 2, (20000, 4), generator=g, dtype=torch.uint8)
    c = D.drop_condition(attrs, g, len(attrs), slice(None), 0.1, "uniform")
    assert set(c.unique().tolist()) <= {-1.0, 0.0, 1.0} and torch.equal(c[c != 0], attrs[c != 0].float() * 2 - 1)
    specified = (c != 0).sum(1)
    # dropped whole with p 0.1; otherwise a rate u ~ U(0, 1) makes the number specified uniform on 0..K
    share = torch.bincount(specified, minlength=5).double() / len(c)
    want = torch.full((5,), 0.9 / 5, dtype=torch.float64)
    want[0] += 0.1
    assert (share - want).abs().max() < 0.015, share
    c = D.drop_condition(attrs, g, len(attrs), slice(None), 0.0, 0.25)
    assert abs((c == 0).double().mean().item() - 0.25) < 0.01
    # balanced: an attribute in its rarer state (here: present for the first two, absent for the last two) is only
    # ever dropped with the whole condition; its other state is dropped at the uniform rate, half of the time
    rare = torch.tensor([1, 1, 0, 0], dtype=torch.uint8)
    c = D.drop_condition(attrs, g, len(attrs), slice(None), 0.1, "balanced", rare)
    whole, is_rare = (c == 0).all(1), attrs == rare
    assert abs(whole[is_rare.any(1)].double().mean().item() - 0.1) < 0.01 and (c[~whole][is_rare[~whole]] != 0).all()
    assert abs((c[~whole][~is_rare[~whole]] == 0).double().mean().item() - 0.5) < 0.02


def test_resume_is_bit_exact(faces, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(train_args(faces, a, "--max-steps", "4", "--ckpt-every", "2", "--dropout", "0.3"))
    train.main(train_args(faces, a, "--max-steps", "9", "--resume", "--dropout", "0.3"))
    train.main(train_args(faces, b, "--max-steps", "9", "--dropout", "0.3"))  # 24 images / batch 4: crosses an epoch
    assert_same_training_state(a, b, 9)


def test_resume_takes_every_setting_from_the_checkpoint(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    r = cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "3", "--batch-size", "6")])
    assert r.returncode == 0, r.stderr
    # only --out and --max-steps: data, cache, batch size and model all come from the checkpoint
    r = cli(capsys, train.main, ["--resume", "--out", out, "--max-steps", "5"])
    assert r.returncode == 0 and "resuming" in r.stdout and "at batch 6" in r.stdout, r.stdout + r.stderr
    ckpt = util.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 5 and ckpt["args"]["batch_size"] == 6 and ckpt["args"]["size"] == 16
    rows = [row for row in log_rows(out) if row["loss"]]
    assert [row["step"] for row in rows] == ["1", "2", "3", "4", "5"]  # each step once
    elapsed = [float(row["elapsed_s"]) for row in rows]
    assert elapsed == sorted(elapsed) and elapsed[3] >= elapsed[2]  # continuous across the resume
    # a contradicting flag is refused, naming both values; one that may change is taken
    one_line_error(cli(capsys, train.main, ["--resume", "--out", out, "--size", "32"]), "--size 32", "16")
    one_line_error(cli(capsys, train.main, ["--resume", "--out", out, "--batch-size", "4", "--max-steps", "9"]), "--batch-size 4", "6")
    # nothing to do is said
    r = cli(capsys, train.main, ["--resume", "--out", out, "--max-steps", "4"])
    assert r.returncode == 0 and "nothing to do" in r.stdout and "step 5" in r.stdout, r.stdout


def test_logged_loss_after_a_resume_is_the_uninterrupted_runs(faces, tmp_path):
    # The loss column averages the steps since the last multiple of --log-every; a checkpoint in between carries
    # the running sum, so the row at step 8 is the same number with or without the stop at step 6.
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(train_args(faces, a, "--max-steps", "6", "--log-every", "4"))
    train.main(train_args(faces, a, "--max-steps", "8", "--log-every", "4", "--resume"))
    train.main(train_args(faces, b, "--max-steps", "8", "--log-every", "4"))
    rows = [{r["step"]: r["loss"] for r in log_rows(d) if r["loss"]} for d in (a, b)]
    assert rows[0]["8"] == rows[1]["8"] and rows[0]["4"] == rows[1]["4"] and set(rows[1]) == {"1", "4", "8"}, rows


def test_a_new_run_never_replaces_a_run(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "2")]).returncode == 0
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    r = cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "3", "--ch", "8")])
    one_line_error(r, "already holds a run", "--resume", "--overwrite")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    open(os.path.join(out, "samples_0000002.png"), "wb").close()  # the old run's grid
    r = cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "3", "--ch", "8", "--overwrite")])
    assert r.returncode == 0 and "removed the earlier run's ckpt.pt, log.csv, samples_0000002.png" in r.stdout, r.stderr
    assert util.load_checkpoint(out)["model_args"]["ch"] == 8 and [row["step"] for row in log_rows(out) if row["loss"]] == ["1", "2", "3"]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.csv"]  # nothing of the old run beside the new one
    os.remove(os.path.join(out, "ckpt.pt"))  # a run killed before its first checkpoint left its log
    one_line_error(cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "1")]), "holds an earlier run's files (log.csv)")


def test_two_runs_in_one_out_folder_the_second_is_refused(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    p = long_run(faces, out, until="step 1/")
    r = run_cli("train.py", *train_args(faces, out, "--max-steps", "5", "--seed", "22", "--overwrite"))
    one_line_error(r, f"--out {out} is in use by another run (process {p.pid})")
    os.kill(p.pid, signal.SIGKILL)  # the holder dies without a word: its lock goes with it
    p.communicate(timeout=60)
    r = cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "2", "--overwrite")])
    assert r.returncode == 0 and util.load_checkpoint(out)["step"] == 2, r.stderr


def test_resume_refuses_other_data_before_decoding_it(faces, tmp_path, capsys):
    out, other = str(tmp_path / "run"), tmp_path / "other"
    assert cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "2")]).returncode == 0
    other.mkdir()
    for i, name in enumerate(sorted(os.listdir(faces))):  # as many images, one of them another
        img = Image.open(os.path.join(faces, name)) if i else Image.new("RGB", (20, 20))
        img.save(other / name)
    r = cli(capsys, train.main, ["--resume", "--out", out, "--max-steps", "3", "--data", str(other), "--cache-dir", str(tmp_path / "c2")])
    one_line_error(r, "not the data the checkpoint's run trained on", "--other-data", f"resume with --data {faces}",
                   "(23 images)")
    assert "decoding" not in r.stdout
    moved = shutil.copytree(faces, tmp_path / "moved")  # a moved copy of the same images is the same data
    assert cli(capsys, train.main, ["--resume", "--out", out, "--max-steps", "3", "--data", str(moved)]).returncode == 0
    r = cli(capsys, train.main, ["--resume", "--out", out, "--max-steps", "4", "--data", str(other), "--other-data"])
    assert r.returncode == 0 and util.load_checkpoint(out)["step"] == 4, r.stderr


def test_short_runs_leave_the_warmup_early(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(train_args(faces, out, "--max-steps", "30", "--warmup", "5000", "--lr", "1e-3"))
    assert "lr warm-up 3 (--warmup 5000 is more than a tenth of the run)" in capsys.readouterr().out
    lrs = [float(row["lr"]) for row in log_rows(out) if row["lr"]]
    assert lrs[0] < 1e-3 and all(lr == pytest.approx(1e-3) for lr in lrs[3:])
    train.main(["--resume", "--out", out, "--max-steps", "31"])  # the warm-up was the run's: nothing to say
    assert "more than a tenth" not in capsys.readouterr().out


def fake_clock(monkeypatch, seconds_per_step):
    """train.py's and budget.py's clock, advanced by the training steps alone: nothing then depends on this
    machine's speed."""
    now, real_step = [0.0], train.train_step
    def step(run, *a):
        now[0] += seconds_per_step(run.step)
        return real_step(run, *a)
    monkeypatch.setattr(train, "train_step", step)
    clock = type("clock", (), {"time": staticmethod(lambda: now[0])})
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(budget, "time", clock)
    return now


def test_minutes_draws_four_grids_over_the_run(faces, tmp_path, monkeypatch):
    fake_clock(monkeypatch, lambda step: 0.5)
    out = str(tmp_path / "run")
    args = [a for a in train_args(faces, out, "--minutes", "0.5", "--log-every", "10", "--sample-steps", "2", "--sample-n", "4")]
    del args[args.index("--sample-every"):args.index("--sample-every") + 2]  # as a user runs it: the plan chooses the grids
    train.main(args)
    total = util.load_checkpoint(out)["plan"]["total"]
    grids = sorted(int(f[8:15]) for f in os.listdir(out) if f.startswith("samples_"))
    q = -(-total // 4)  # a quarter, rounded up: three grids on the way and the last
    assert grids == [q, 2 * q, 3 * q, total], (grids, total)
    # extended by a resume, the run keeps four grids over its new length
    train.main(["--resume", "--out", out, "--max-steps", str(2 * total)])
    later = sorted(int(f[8:15]) for f in os.listdir(out) if f.startswith("samples_") and int(f[8:15]) > total)
    q = -(-2 * total // 4)
    assert later == [k * q for k in range(1, 4) if k * q > total] + [2 * total], later


@pytest.mark.parametrize("grid_s, n_grids", [(1.5, 4), (9.0, 1)])
def test_a_short_budget_draws_four_grids_and_uses_its_time(faces, tmp_path, monkeypatch, grid_s, n_grids):
    # A one-minute budget on a slow machine: 2 s a step, and a grid that costs grid_s (its forward passes as
    # timed). The plan comes at step 13, after the first quarter of the run: a grid then, and three more over
    # the rest; the budget is used, not left idle. Grids of 9 s would take half the minute: only the last.
    now = fake_clock(monkeypatch, lambda step: 2.0)
    real_grid = train.sample_grid
    def grid(cfg, env, run):
        now[0] += grid_s
        return real_grid(cfg, env, run)
    monkeypatch.setattr(train, "sample_grid", grid)
    monkeypatch.setattr(budget, "time_forward", lambda *a: grid_s / (4 * 2))  # --sample-n 4, --sample-steps 2
    out = str(tmp_path / "run")
    args = train_args(faces, out, "--minutes", "1", "--log-every", "10", "--sample-steps", "2", "--sample-n", "4")
    del args[args.index("--sample-every"):args.index("--sample-every") + 2]
    train.main(args)
    grids = sorted(int(f[8:15]) for f in os.listdir(out) if f.startswith("samples_"))
    assert len(grids) == n_grids and grids[-1] == util.load_checkpoint(out)["step"], grids
    if n_grids == 4:
        assert grids[0] == 13, grids
        assert 0.9 * 60 <= now[0] <= 60, now[0]
    # the last grid is priced with a margin of a fifth and 3 s, and the end comes on a step's boundary (2 s)
    assert 60 - 0.2 * grid_s - 3 - 2 - 1 <= now[0] <= 60, now[0]


def test_minutes_fits_the_run_into_the_budget_and_follows_a_slowdown(faces, tmp_path, monkeypatch, capsys):
    # A fake clock, so nothing here depends on this machine's speed: a training step takes 0.25 s until
    # step 60, then 0.5 s (the machine got busy). The plan from the first steps would overrun by a third.
    now = fake_clock(monkeypatch, lambda step: 0.25 if step < 60 else 0.5)
    out = str(tmp_path / "run")
    train.main(train_args(faces, out, "--minutes", "1", "--log-every", "10", "--warmup", "1000"))
    printed = capsys.readouterr().out
    planned = int(printed.split(" steps in all")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert 200 <= planned <= 240  # 60 s at 4 steps/s, less the probe and a 2% margin
    assert "steps are too few for faces" in printed and "about --minutes 5 on this machine" in printed  # 1,000 steps at 4/s
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    a, plan, steps = ckpt["args"], ckpt["plan"], ckpt["step"]
    assert 0.9 * 60 <= now[0] <= 60  # ended within the budget, not far short of it
    assert printed.count(" steps in all") >= 2 and steps < 0.8 * planned  # re-planned
    assert plan["total"] == steps and plan["lr_decay"] == a["lr_decay"] == "cosine"
    assert plan["warmup"] == planned // 10 and plan["ema_decay"] == pytest.approx(1 - 10 / steps)
    assert a["max_steps"] is None and a["warmup"] == 1000 and a["ema_decay"] == 0.9999  # the settings stay as given
    lrs = [float(row["lr"]) for row in log_rows(out) if row["lr"]]
    assert max(lrs) <= 2e-4 and lrs[-1] < 1e-6  # the cosine decay ends at the last step
    # it resumes to the planned end, and the flags that would contradict the budget are refused
    train.main(["--resume", os.path.join(out, "ckpt.pt")])
    assert "nothing to do" in capsys.readouterr().out
    for extra in (["--max-steps", "10"], ["--epochs", "2"]):
        code, _, err = main_error(capsys, train.main, train_args(faces, str(tmp_path / "x"), "--minutes", "1", *extra))
        assert code == 2 and "--minutes chooses the number of steps itself" in err


def minutes_env(device="cpu"):
    return SimpleNamespace(device=SimpleNamespace(type=device), ctx=contextlib.nullcontext(), world=1, ddp=False,
                           say=print, compile=False, ctrl=None)


@pytest.mark.parametrize("minutes,min_steps,lr,ch,batch,dropout,new_lr", [
    ("1", 10**12, None, 64, 8, 0.0, 4e-4), ("1", 10**12, "1e-4", 64, 8, 0.0, 1e-4), ("500000", 1, None, 128, 16, 0.1, 2e-4)])
def test_minutes_narrows_the_model_only_when_the_budget_needs_it(monkeypatch, capsys, minutes, min_steps, lr, ch, batch,
                                                                 dropout, new_lr):
    # A budget too short for the preset halves its channels and batch together (here once: batch >= 8) and
    # scales the learning rate by the width ratio, unless --lr is given; a generous one keeps the preset as it
    # is, dropout and lr included. The budgets are far from the edge, so the outcome does not depend on this
    # machine's speed.
    monkeypatch.setattr(budget, "MIN_STEPS", min_steps)
    args, given = settings.make_parser().parse(["--size", "16", "--ch-mult", "1,2", "--attn-res", "8", "--batch-size", "16",
                                             "--minutes", minutes] + (["--lr", lr] if lr else []))
    env = minutes_env()
    env.device = torch.device("cpu")
    cfg = train.fit_model_to_minutes(args, env, given, stage_of(args))
    assert (cfg.ch, cfg.batch_size, cfg.dropout) == (ch, batch, dropout) and args.ch is None  # a new settings object
    printed = capsys.readouterr().out
    assert cfg.lr == pytest.approx(new_lr) and ("--lr 0.0004, 0.0002 times 128/64" in printed) == (lr is None and ch == 64)


@pytest.mark.parametrize("device,seconds,ch", [("cuda", lambda ch, b: 0.1, 128),  # launch-bound: the step's time is fixed
                                              ("cuda", lambda ch, b: ch * b * 1e-5, 64),  # faster per image, and fits
                                              ("cpu", lambda ch, b: ch * ch * b * 1e-5, 32)])  # FLOPs: none fits
def test_minutes_never_narrows_to_a_model_slower_per_image(monkeypatch, device, seconds, ch):
    # On a GPU every candidate is timed, and a narrower model is taken only where it is faster per image; with
    # none leaving MIN_STEPS, the fastest per image. The timings are given, so nothing depends on a device.
    monkeypatch.setattr(budget, "time_step", lambda build, probe, shape, batch, *a: seconds(build.args[0].ch, batch))
    args, given = settings.make_parser().parse(["--size", "64", "--minutes", "3"])
    cfg = train.fit_model_to_minutes(args, minutes_env(device), given, stage_of(args))
    assert cfg.ch == ch and cfg.batch_size == ch, cfg


def test_a_first_run_far_beyond_a_day_says_so(monkeypatch, capsys):
    args, given = settings.make_parser().parse(["--size", "64", "--epochs", "100", "--data", "my data"])
    env = SimpleNamespace(device=torch.device("cpu"), world=1, ctx=contextlib.nullcontext(), say=print)
    monkeypatch.setattr(budget, "time_step", lambda *a, **k: 2.0 * a[3])  # 2 s per image, as for the 64x64 preset on a laptop
    train.estimate_run(args, env, stage_of(args), 162_770)
    line = capsys.readouterr().out
    assert "127,100 steps of 128 images" in line and "about 9038h" in line and "far beyond a day" in line, line
    import shlex
    hint = shlex.split(line.split("in 30 minutes: ")[1])
    assert hint[:2] == ["python", "train.py"] and settings.make_parser().parse(hint[2:])[0].minutes == 30 and "my data" in hint
    monkeypatch.setattr(budget, "time_step", lambda *a, **k: 0.001)
    train.estimate_run(args, env, stage_of(args), 162_770)
    assert "far beyond" not in capsys.readouterr().out


def test_memory_plan_refuses_a_batch_that_cannot_fit_and_names_one_that_can(faces, tmp_path, monkeypatch, capsys):
    args = train_args(faces, str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "16")
    m = unet.UNet(unet.preset(16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,)))
    per_image = [1.25 * saved_per_image(m, D.GaussianDiffusion(50)) for m.grad_checkpoint in (False, True)]
    state = 20 * m.num_params()
    # room for 5 images without checkpointing, and for more than 16 with it: auto turns it on
    monkeypatch.setattr(budget, "device_memory", lambda device: (state + 5.5 * per_image[0]) / 0.85)
    assert per_image[1] * 16 < 5.5 * per_image[0]
    train.main(args)
    assert "activation checkpointing on" in capsys.readouterr().out
    # with checkpointing off, the same batch is refused and the error names a batch that fits
    code, _, err = main_error(capsys, train.main, args + ["--grad-checkpoint", "off", "--overwrite"])
    assert code == 2 and "a batch of 16 needs" in err and err.count("\n") == 1, err
    may_use, available = err.split("more than the ")[1].split(" a run may use (85% of the ")  # says both, consistently
    assert float(may_use.split()[0]) < float(available.split()[0]), err
    fits = int(err.split("use --batch-size ")[1].split()[0])
    assert 4 <= fits <= 6, err  # room for about 5 (the measurement differs a little with the memory format)
    train.main(args + ["--grad-checkpoint", "off", "--overwrite", "--batch-size", str(fits)])
    assert "activation checkpointing off" in capsys.readouterr().out
    # and a dry run uses a batch small enough to run anywhere, with the warm-up at most a tenth of the run
    train.main(train_args(faces, str(tmp_path / "dry"), "--dry-run", "--batch-size", "16", "--warmup", "100"))
    out = capsys.readouterr().out
    assert "at batch 1;" in out and "lr warm-up 0" in out and "dry run: the setup works" in out


def test_memory_plan_counts_resident_images_and_ddp_buckets(monkeypatch):
    m = unet.UNet(unet.preset(16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(8,)))
    diffusion = D.GaussianDiffusion(50)
    def plan(ddp=False, resident_bytes=0):
        return budget.plan_memory(m, D.Denoising.probe_losses, (3, 16, 16), 4, 1, ddp, "auto", torch.device("cpu"),
                                  contextlib.nullcontext(), lambda *a: None, str, resident_bytes)
    per_image = 1.25 * saved_per_image(m, diffusion)
    monkeypatch.setattr(budget, "device_memory", lambda device: (20 * m.num_params() + 5.5 * per_image) / 0.85)
    assert not plan()  # 4 images fit in the room for 5.5
    assert plan(resident_bytes=2 * per_image)  # the training images take the room of 2
    assert not m.grad_checkpoint  # the plan says what to do; train.py sets it
    # room for 4 images and 2 more bytes per parameter: enough alone, not beside DDP's buckets (4 bytes per parameter)
    monkeypatch.setattr(budget, "device_memory", lambda device: (22 * m.num_params() + 4 * per_image) / 0.85)
    assert not plan()
    assert plan(ddp=True)


def test_gpu_memory_budget_is_what_is_free_within_the_process_limit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60e9, 80e9))  # free, total
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 2e9)  # already this process's
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0, raising=False)
    assert budget.device_memory(torch.device("cuda")) == 62e9
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.2, raising=False)  # a 16 GB share
    assert budget.device_memory(torch.device("cuda")) == 16e9


def test_bpd_command_prints_the_bound_or_its_estimate(tiny_run, capsys):
    ckpt, totals = os.path.join(tiny_run, "ckpt.pt"), []
    for estimate in ([], ["--bpd-t", "7"]):
        sample.main([ckpt, "--bpd", "3", *estimate])
        line = capsys.readouterr().out.splitlines()[-1]
        assert "bits/dim on 1 validation image " in line and "prior L_T" in line and "decoder L_0" in line, line
        assert "(one image: no standard error)" in line and "nan" not in line, line
        assert ("7 stratified t" in line) == bool(estimate), line
        totals.append(float(line.split("= ")[1].split()[0]))
    assert 0 < totals[0] < 100 and 0 < totals[1] < 100
    code, _, err = main_error(capsys, sample.main, [ckpt, "--bpd-t", "7"])
    assert code == 2 and "--bpd-t does not apply to sampling" in err
    code, _, err = main_error(capsys, sample.main, [ckpt, "--bpd", "3", "--bpd-t", "100000"])
    assert code == 2 and "T-1 = 49" in err and "data:" not in capsys.readouterr().out  # refused before decoding


def test_benchmarks_report_throughput(tiny_run, capsys):
    r = cli(capsys, train.main, [*TINY, "--bench", "--bench-steps", "2", "--peak-tflops", "1"])
    assert r.returncode == 0 and "img/s" in r.stdout and "GFLOP/img" in r.stdout and "MFU" in r.stdout, r.stderr
    assert "ms/step (host" in r.stdout
    r = cli(capsys, sample.main, ["--bench", "--size", "16", "--batch-size", "2", "--steps", "2"])
    assert r.returncode == 0 and "images/s" in r.stdout and "16x16" in r.stdout, r.stderr
    r = cli(capsys, sample.main, [tiny_run, "--bench", "--batch-size", "2", "--steps", "2"])  # the checkpoint's model
    assert r.returncode == 0 and f"loaded {tiny_run}" in r.stdout and "2 images of 16x16" in r.stdout, r.stderr


# -----------------------------------------------------------------------------
# train.py under torchrun, and on a GPU when there is one


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(faces, tmp_path, capsys):
    # As the README's command, without --seed: the seed is drawn on rank 0 and sent to every rank, so the ranks
    # shard one permutation (6 steps of 8 of 24 images: two epochs), and one process with that seed matches.
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    common = ["--max-steps", "6", "--batch-size", "8", "--dropout", "0", "--log-every", "2"]
    no_seed = lambda args: [a for i, a in enumerate(args) if "--seed" not in args[max(i - 1, 0):i + 1]]
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *no_seed(train_args(faces, two, *common)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("step 6/6") == 1  # only rank 0 logs
    assert "Grad strides do not match" not in r.stderr  # the weights take their gradients' strides: DDP copies none
    seed = r.stdout.split(", seed ")[1].split()[0]
    assert cli(capsys, train.main, [*no_seed(train_args(faces, one, *common)), "--seed", seed]).returncode == 0
    (m1, e1, _, _), (m2, e2, _, _) = states(os.path.join(one, "ckpt.pt")), states(os.path.join(two, "ckpt.pt"))
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(e2[k], e1[k], rtol=1e-4, atol=1e-5)
    # the logged loss is the same mean (steps 1 and 2 averaged at step 2: a sum reduced over the ranks in
    # place at step 1 would count step 1 twice)
    losses = [[float(row["loss"]) for row in log_rows(d) if row["loss"]] for d in (one, two)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)  # steps 1, 2, 4 and 6
    # the 2-process checkpoint resumes in 1 process and continues like the 1-process run
    more = ["--max-steps", "8", "--batch-size", "8", "--dropout", "0"]
    assert run_cli("train.py", *no_seed(train_args(faces, two, *more)), "--resume").returncode == 0
    assert cli(capsys, train.main, [*no_seed(train_args(faces, one, *more)), "--resume"]).returncode == 0
    (m1, _, _, s1), (m2, _, _, s2) = states(os.path.join(one, "ckpt.pt")), states(os.path.join(two, "ckpt.pt"))
    assert s1 == s2 == 8
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-4, atol=1e-5)


def test_minutes_under_two_processes_ends_on_time_with_a_checkpoint(faces, tmp_path):
    # Rank 0's clock sets the end step and every re-plan (here one per step, --log-every 1), so the ranks
    # never disagree on the last step (which left them waiting on each other's collectives for ever).
    out = str(tmp_path / "run")
    r = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                *train_args(faces, out, "--minutes", "0.25", "--batch-size", "8"), timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    took = r.stdout.split("the run took ")[1].split()[0]  # e.g. 0m14s
    assert int(took.split("m")[0]) * 60 + int(took.split("m")[1][:-1]) <= 1.1 * 15, r.stdout[-1000:]
    ckpt = util.load_checkpoint(out)
    assert ckpt["step"] == ckpt["plan"]["total"] > 10 and r.stdout.count("interrupted") == 0


def test_resume_takes_the_devices_own_optimizer_settings(faces, tmp_path, monkeypatch):
    # The optimizer's state dict carries the run's fused/foreach choice; a resume keeps the moments and takes
    # the resuming device's choice (a CPU checkpoint resumed on a GPU gets the fused AdamW back).
    out = str(tmp_path / "run")
    train.main(train_args(faces, out, "--max-steps", "2"))
    assert util.load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] in (False, None)
    monkeypatch.setattr(train, "fused_adamw", lambda device: True)  # a device with a fused AdamW (CPU has one too)
    train.main(train_args(faces, out, "--max-steps", "3", "--resume"))
    assert util.load_checkpoint(out)["optimizer"]["param_groups"][0]["fused"] is True


def test_more_processes_than_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # (pick_device makes it current)
    for rank in (0, 1):  # every process of a 2-process torchrun on a 1-GPU machine refuses, rank 0 too
        with pytest.raises(util.UsageError, match="--nproc_per_node=1"):
            budget.pick_device("cuda", rank, 2)
    assert budget.pick_device("cuda", 0, 1) == torch.device("cuda:0")


def test_auto_precision_needs_native_bf16_and_fp32_means_fp32(monkeypatch):
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)  # a V100, a T4
    with pytest.warns(UserWarning, match="CUDA is not available"):  # the autocast object itself, on this CPU machine
        assert budget.autocast(torch.device("cuda"), "auto")[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    with pytest.warns(UserWarning, match="CUDA is not available"):
        assert budget.autocast(torch.device("cuda"), "auto")[0] == "bf16"
    assert budget.autocast(torch.device("cpu"), "auto")[0] == "fp32"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    budget.autocast(torch.device("cpu"), "bf16")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_train_resume_sample_and_bench(faces, tmp_path):
    # The GPU path end to end: bf16 or fp16 autocast, fused AdamW, channels_last, the GPU-resident images; a
    # resume on the GPU of a checkpoint written on the CPU; sampling. Numbers agree with the CPU's loosely.
    # (--no-compile: a compiled step is another ~90 s of start-up; the GPU check measures that path)
    out, gpu = str(tmp_path / "run"), ["--device", "cuda"]
    assert run_cli("train.py", *train_args(faces, out, "--max-steps", "2")).returncode == 0  # on the CPU
    r = run_cli("train.py", *train_args(faces, out, "--max-steps", "4", "--resume", "--sample-every", "4",
                                        "--sample-steps", "2", "--sample-n", "4"), *gpu, "--no-compile")
    assert r.returncode == 0 and "device cuda" in r.stdout, r.stderr[-2000:]
    assert ", bf16," in r.stdout or ", fp16," in r.stdout, r.stdout  # mixed precision on a GPU
    ckpt = util.load_checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["optimizer"]["param_groups"][0]["fused"] is True
    assert all(torch.isfinite(v).all() for v in ckpt["ema"].values())
    r = run_cli("sample.py", out, "--n", "4", "--steps", "3", "--out", str(tmp_path / "g.png"), *gpu)
    assert r.returncode == 0 and os.path.exists(tmp_path / "g.png"), r.stderr[-2000:]
    r = run_cli("train.py", *TINY, "--bench", "--bench-steps", "2", *gpu, "--no-compile")
    assert r.returncode == 0 and "host" in r.stdout, r.stderr[-2000:]


# -----------------------------------------------------------------------------
# train.py: never lose a run (signals, crashes, full disks) and bad input


def test_nan_guard_stops_and_keeps_last_good_checkpoint(faces, tmp_path, monkeypatch, capsys):
    real_step = train.train_step
    def diverging(run, *a):  # from step 5 on, a weight is NaN
        if run.step >= 5:
            with torch.no_grad():
                run.params[0].fill_(float("nan"))
        return real_step(run, *a)
    monkeypatch.setattr(train, "train_step", diverging)
    out = str(tmp_path / "nan")
    code, _, _ = main_error(capsys, train.main, train_args(faces, out, "--max-steps", "20", "--ckpt-every", "1"))
    assert "diverged" in str(code) and "was kept" in str(code), code
    ckpt = util.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def long_run(faces, out, until="step 2/", stderr=subprocess.STDOUT):
    """A training run in another process that would last for ever, once it has printed `until`."""
    p = subprocess.Popen([sys.executable, "-u", "train.py", *train_args(faces, out, "--max-steps", "100000")],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=stderr, text=True)
    next(line for line in p.stdout if until in line)
    return p


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signals_write_a_checkpoint_and_the_hint_resumes(faces, tmp_path, sig, code, capsys):
    import shlex
    out = str(tmp_path / "sp ace")
    p = long_run(faces, out)
    p.send_signal(sig)
    rest = p.communicate(timeout=120)[0]
    assert p.returncode == code and "interrupted" in rest and "Traceback" not in rest, rest
    assert "stopping now and writing a checkpoint" in rest  # acknowledged at once
    assert ("press Ctrl-C again" in rest) == (sig != signal.SIGHUP)  # a closed terminal has no keys to press
    step = util.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert step >= 2
    if sig == signal.SIGINT:  # the printed hint, run exactly as printed (a shell would split it so), continues the run
        hint = shlex.split(rest.split("Continue with: ")[1].splitlines()[0])
        assert hint[:3] == ["python", "train.py", "--resume"]
        r = cli(capsys, train.main, [*hint[2:], "--max-steps", str(step + 1)])
        assert r.returncode == 0 and util.load_checkpoint(out)["step"] == step + 1, r.stderr


def test_a_closed_stdout_stops_the_run_with_a_checkpoint(faces, tmp_path):
    # `train.py ... | head -2`: the reader goes away; the run stops as on SIGTERM, and says so in its --out
    out = str(tmp_path / "run")
    p = long_run(faces, out, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 141 and "Traceback" not in err and util.load_checkpoint(out)["step"] >= 2, err
    said = open(os.path.join(out, "stdout.log")).read()
    assert "interrupted by SIGPIPE (stdout closed)" in said and "Continue with: python train.py --resume" in said
    assert "Continue with: python train.py --resume" in err  # stderr, still read after `| head`, says it too


def signal_twice(faces, out, sig):
    """Start a long training run, signal it after step 2, and again once it has acknowledged the first.
    -> (the process, ended, and what it printed after the acknowledgement)."""
    p = subprocess.Popen([sys.executable, "-u", "train.py", *train_args(faces, out, "--max-steps", "100000")],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if "step 2/" in line:
            p.send_signal(sig)
        if "stopping now" in line or "stopping after this step" in line:
            p.send_signal(sig)
            break
    return p, p.communicate(timeout=120)[0]


def test_a_second_sigterm_does_not_cut_the_checkpoint_short(faces, tmp_path):
    # Slurm signals every process and torchrun forwards the signal again: the second one must not kill the
    # process while it writes the checkpoint. The first is acknowledged at once.
    out = str(tmp_path / "run")
    p, rest = signal_twice(faces, out, signal.SIGTERM)
    assert p.returncode == 143 and "checkpoint written" in rest, rest
    assert util.load_checkpoint(out)["step"] >= 2 and sorted(os.listdir(out)) == ["ckpt.pt", "log.csv"]


def test_a_second_ctrl_c_quits_at_once_and_the_next_start_cleans_up(faces, tmp_path):
    out = str(tmp_path / "run")
    p, _ = signal_twice(faces, out, signal.SIGINT)
    assert p.returncode in (-signal.SIGINT, 130)  # killed by the second Ctrl-C, or done just before it
    # what a process killed mid-write leaves: a temporary file whose process is gone (pid_max is below 2^22 + 1);
    # one of a live process (this one) is another writer's and stays
    os.makedirs(out, exist_ok=True)
    for name in ("ckpt.pt.tmp4194305", f"log.csv.tmp{os.getpid()}"):
        open(os.path.join(out, name), "w").close()
    r = run_cli("train.py", *train_args(faces, out, "--max-steps", "1", "--overwrite"))
    assert r.returncode == 0 and "removed the temporary files" in r.stdout, r.stderr
    assert "ckpt.pt.tmp4194305" not in os.listdir(out) and f"log.csv.tmp{os.getpid()}" in os.listdir(out)


def test_a_signal_cuts_a_long_step_or_grid_short(faces, tmp_path, monkeypatch, capsys):
    # A signal during a step (on a CPU a step can take minutes) drops the half-done step: the checkpoint is the
    # previous step's, exactly as an uninterrupted run had it then.
    real_step = train.train_step
    def signalled_step(*a):
        if a[0].step == 3:  # the signal arrives once this step has begun
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*a)
    monkeypatch.setattr(train, "train_step", signalled_step)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    code, out, _ = main_error(capsys, train.main, train_args(faces, a, "--max-steps", "100", "--dropout", "0.3", "--warmup", "0"))
    assert code == 143 and "stopping now" in out and "interrupted by SIGTERM at step 3" in out, out
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(train_args(faces, b, "--max-steps", "3", "--dropout", "0.3", "--warmup", "0"))
    assert_same_training_state(a, b, 3)
    assert torch.equal(util.load_checkpoint(a)["rng"]["torch"], util.load_checkpoint(b)["rng"]["torch"])
    # a signal during a long sample grid (1,024 images at 50 steps: minutes) ends the run within seconds, with a checkpoint
    r = subprocess.Popen([sys.executable, "-u", "train.py", *train_args(faces, str(tmp_path / "g"), "--max-steps", "5",
                          "--sample-every", "1", "--sample-n", "1024", "--sample-steps", "50")],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in r.stdout:
        if "step 1/" in line:
            time.sleep(1)  # well into the grid
            r.send_signal(signal.SIGTERM)
            break
    rest = r.communicate(timeout=60)[0]
    assert r.returncode == 143 and "cut short" in rest and "checkpoint written" in rest, rest


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    good = dict(format=util.CKPT_FORMAT, step=1, model={"w": torch.ones(3)}, args={}, model_args={})
    util.save_checkpoint(good, path)
    real_save = torch.save
    def crashing_save(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half-written file, then the write fails
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 12568192 vs 12568080")
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(util.WriteError, match="cannot write .*ckpt.pt .*--out"):
        util.save_checkpoint(dict(good, step=2), path)
    monkeypatch.undo()
    assert util.load_checkpoint(path, parts=())["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]  # no model


def limited_run(limit, *args):
    """Run a command whose every file may grow to `limit` bytes: a longer write fails part-way (EFBIG),
    as on a full disk or over a quota."""
    import resource
    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=240, preexec_fn=limit_files)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_a_write_that_fails_midway_keeps_the_last_checkpoint_and_cache(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli(capsys, train.main, [*train_args(faces, out, "--max-steps", "2")]).returncode == 0
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    assert len(before) > 100_000
    r = limited_run(50_000, "train.py", "--resume", "--out", out, "--max-steps", "4")
    one_line_error(r, os.path.join(out, "ckpt.pt"), "--out")
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    # the cache: decoded, then a write that fails part-way
    cache = str(tmp_path / "cache2")
    r = limited_run(4_000, "train.py", "--data", faces, "--cache-dir", cache, "--out", str(tmp_path / "run2"), *TINY, "--max-steps", "1")
    one_line_error(r, "cannot write", cache, "cache folder")
    assert os.listdir(cache) == []


def test_unwritable_out_names_the_flag(faces, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    r = cli(capsys, train.main, [*train_args(faces, str(tmp_path / "file" / "out"), "--max-steps", "1")])
    one_line_error(r, "--out", "cannot write there")
    assert "decoding" not in r.stdout


def test_a_failed_start_leaves_no_folders(tmp_path, capsys):
    out, cache = tmp_path / "a" / "out", tmp_path / "c" / "cache"
    code, _, err = main_error(capsys, train.main, ["--data", str(tmp_path / "missing"), "--out", str(out), "--cache-dir", str(cache)])
    assert code == 2 and "no such folder" in err
    code, _, err = main_error(capsys, train.main, ["--data", str(tmp_path / "missing"), "--download", "--out", str(out)])
    assert code == 2 and os.listdir(tmp_path) == [], os.listdir(tmp_path)


@pytest.mark.parametrize("extra,words", [
    (["--size", "17"], ["not divisible by 2"]),
    (["--attn-res", "7"], ["--attn-res 7", "16,8"]),
    (["--batch-size", "24"], ["23 images", "--batch-size 24"]),  # 24 files, one held out
    (["--warmup", "-5"], ["--warmup", ">= 0"]),
    (["--ckpt-every", "-1"], ["--ckpt-every"]),
    (["--sample-every", "-2"], ["--sample-every"]),
    (["--ch-mult", ""], ["--ch-mult", "comma-separated"]),
])
def test_checks_that_need_no_data_come_before_decoding(faces, tmp_path, capsys, extra, words):
    code, out, err = main_error(capsys, train.main, train_args(faces, str(tmp_path / "out"), *extra))
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert "decoding" not in out and not os.path.exists(tmp_path / "cache")


@pytest.mark.parametrize("cmd,message", [
    (["train.py", "--device", "gpu"], "not a device"),
    (["train.py", "--ema-decay", "1.5"], "--ema-decay"),
    (["sample.py", "x.pt", "--eta", "-1"], "--eta"),
    (["sample.py", "x.pt", "--eta", "nan"], "finite"),
    (["sample.py", "x.pt", "--guidance", "inf"], "finite"),
    (["train.py", "--lr", "nan"], "finite"),
    (["train.py", "--weight-decay", "-1"], "--weight-decay"),
    (["train.py", "--dropout", "1"], "--dropout"),
    (["train.py", "--ch-mult", "1,0"], "--ch-mult"),
    (["sample.py", "x.pt", "--bpd-t", "5"], "--bpd-t does not apply to sampling"),
    (["sample.py", "x.pt", "--bpd", "3", "--steps", "5"], "--steps does not apply to --bpd"),
    (["sample.py", "x.pt", "--bpd", "3", "--sampler", "ddpm"], "--sampler does not apply to --bpd; drop --sampler\n"),
    (["sample.py", "--figure", "schedules", "--sampler", "ddpm"], "--sampler does not apply to --figure schedules; drop --sampler\n"),
    (["train.py", "--timesteps", "1"], "must be >= 2"),
    (["train.py", "--size", "1048576", "--ch", "4", "--ch-mult", "1", "--attn-res", "1048576", "--device", "cpu"],
     "needs at least"),
    (["train.py", "--size", "4096", "--ch-mult", "1,1,1,1,1,1,1,1", "--attn-res", "32", "--device", "cpu"], "needs at least"),
    (["train.py", "--size", "48"], "--attn-res (the --size 32 preset's) 16"),
    (["train.py", "--data", ""], "--data: is empty"),
    (["train.py", "--out", " "], "--out: is empty"),
    (["train.py", "--resume", "--overwrite"], "drop one of them"),
    (["train.py", "--other-data"], "add --resume"),
    (["sample.py", "x.pt", "--crop", "none"], "--crop does not apply to sampling"),
    (["sample.py", "x.pt", "--interpolate", "3", "--n", "7"], "--n does not apply to --interpolate"),
    (["sample.py", "x.pt", "--interpolate", "3", "--eta", "0.5"], "deterministic sampler"),
    (["sample.py", "--figure", "schedules", "--n", "7"], "--n does not apply to --figure schedules"),
    (["sample.py", "--figure", "schedules", "--sampler", "ddpm"], "--sampler does not apply to --figure schedules"),
    (["sample.py", "--figure", "attention", "x.pt", "--out-dir", "d"], "--out-dir does not apply to --figure attention"),
    (["sample.py", "x.pt", "--bench", "--n", "2"], "--n does not apply to --bench"),
    (["sample.py", "x.pt", "--out", ""], "--out: is empty"),
    (["train.py", "--minutes", "1e12"], "at most 525,600"),
    (["train.py", "--seed", "99999999999999999999"], "0..2^63-1"),
    (["train.py", "--seed", "-1"], "0..2^63-1"),
    (["train.py", "--lr", "1e12"], "diverges"),
    (["train.py", "--attrs", ""], "--attrs ''"),
    (["train.py", "--p-uncond", "0.5"], "add --attrs"),
    (["train.py", "--ch-mult", "1,,2"], "positive integers"),
    (["train.py", "--ch-mult", "-1,2"], "--flag=VALUE"),
    (["train.py", "--ch", "1e12"], "invalid positive integer value"),
    (["train.py", "--log-every", "x"], "invalid positive integer value"),
    (["train.py", "--sample-every", "1.5"], "invalid integer value"),
    (["train.py", "--dry-run", "--minutes", "1"], "--dry-run"),
    (["train.py", "--sample-n", "100000"], "[1, 1024]"),
    (["train.py", "--ch", "100000", "--device", "cpu"], "parameters"),
    (["sample.py", "x.pt", "--eta", "2"], "[0, 1]"),
    (["sample.py", "x.pt", "--eta", "1e6"], "[0, 1]"),
    (["sample.py", "--bench", "--size", "17"], "--size 17"),
    (["sample.py", "x.pt", "--n", "2000", "--out-dir", "gen", "--mask", "center"], "add --init"),  # with --out-dir, --n may exceed the grid
    (["sample.py", "x.pt", "--size", "64"], "--bench"),
    (["sample.py", "x.pt", "--figure", "reverse", "--n", "20"], "up to 8"),
    (["sample.py", "x.pt", "--attrs", ""], "--attrs ''"),
    (["train.py", "--device", "meta"], "not a device these scripts can run on"),
    (["sample.py", "x.pt", "--device", "meta"], "not a device these scripts can run on"),
    (["sample.py", "--bench", "--size", "1048576"], "--size 1048576: the 256 preset"),
    (["train.py", "--attr-film"], "--attr-film lets a conditional model's attributes scale and shift each block"),
    (["train.py", "--peak-tflops", "5"], "--peak-tflops is for --bench"),
    (["train.py", "--bench-steps", "5"], "--bench-steps is for --bench"),
    (["sample.py", "x.pt", "--figure", "forward", "--init", "README.md", "--sampler", "ddpm"],
     "--sampler does not apply to --figure forward; drop --sampler: with --init the figure noises that image"),
])
def test_bad_flags_get_one_line_errors(cmd, message, capsys, tmp_path):
    main = {"train.py": train.main, "sample.py": sample.main}[cmd[0]]
    code, _, err = main_error(capsys, main, cmd[1:] + (["--out", str(tmp_path / "out")] if main is train.main else []))
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_help_shows_each_default_once_and_true(capsys):
    for main in (train.main, sample.main, data.main):
        code, out, _ = main_error(capsys, main, ["-h"])
        assert code == 0 and "(default: None)" not in out
        entries = out.split("\n  -")
        assert all(e.count("default") <= 1 for e in entries), [e for e in entries if e.count("default") > 1]
        if main is train.main:
            assert "--resume takes every setting from the checkpoint" in out


# -----------------------------------------------------------------------------
# sample.py: checkpoint to images


def test_sampling_writes_a_grid_and_numbered_pngs(tiny_run, tmp_path, capsys):
    r = cli(capsys, sample.main, [os.path.join(tiny_run, "ckpt.pt"), "--n", "5", "--batch-size", "3", "--steps", "3",
                "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "pngs")])
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout and sorted(os.listdir(tmp_path / "pngs")) == [f"{i:06d}.png" for i in range(5)]
    assert torchvision.io.read_image(str(tmp_path / "pngs" / "000004.png")).shape == (3, 16, 16)
    grid = torchvision.io.read_image(str(tmp_path / "grid.png"))  # 5 faces in rows of 5 (up to 8 in one row)
    assert grid.shape == (3, 18 + 2, 5 * 18 + 2) and torch.equal(grid[:, 2:18, 2 + 4 * 18:18 + 4 * 18],
                                                                 torchvision.io.read_image(str(tmp_path / "pngs" / "000004.png")))
    r = cli(capsys, sample.main, [os.path.join(tiny_run, "ckpt.pt"), "--n", "2", "--sampler", "ddpm", "--out", str(tmp_path / "g2.png")])
    assert r.returncode == 0 and "ddpm with 50 steps" in r.stdout, r.stderr


def test_samples_are_what_the_model_draws_with_the_library(tiny_run, tmp_path):
    sample.main([tiny_run, "--n", "3", "--steps", "4", "--seed", "9", "--out", str(tmp_path / "p.png"), "--out-dir", str(tmp_path / "p")])
    ckpt = util.load_checkpoint(tiny_run, networks=sample.NETWORKS)
    model = unet.from_checkpoint(ckpt)
    diffusion = D.GaussianDiffusion(ckpt["args"]["timesteps"])
    x = diffusion.sample(model.eval(), (3, 3, 16, 16), "ddim", 4, D.DEFAULT_ETA, torch.Generator().manual_seed(9), device="cpu",
                         clip=True)  # images: clipped, as sample.py does
    assert all(torch.equal(torchvision.io.read_image(str(tmp_path / "p" / f"00000{i}.png")), data.to_uint8(x)[i]) for i in range(3))


@pytest.mark.parametrize("sampler", ["dpm++", "dpm++sde"])
def test_dpm_solvers_draw_from_a_checkpoint(tiny_run, tmp_path, capsys, sampler):
    sample.main([tiny_run, "--n", "2", "--sampler", sampler, "--steps", "5", "--out", str(tmp_path / "dpm.png")])
    assert f"{sampler} with 5 steps" in capsys.readouterr().out and os.path.exists(tmp_path / "dpm.png")


def test_sampling_shows_its_progress_with_an_eta(tiny_run, tmp_path, monkeypatch, capsys):
    # a clock that moves 3 s per reading: the 50 steps of ddpm take minutes, and say so as they go
    now = [0.0]
    def tick():
        now[0] += 3.0
        return now[0]
    monkeypatch.setattr(util, "time", SimpleNamespace(time=tick, sleep=lambda s: None))
    sample.main([tiny_run, "--n", "3", "--batch-size", "2", "--sampler", "ddpm", "--out", str(tmp_path / "g.png")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling: ")]
    assert len(lines) > 5 and all("ETA" in line for line in lines[:-1]) and lines[-1].startswith("sampling: 3/3 images"), lines


def test_an_out_dir_of_an_earlier_run_is_refused_and_a_full_disk_stops_sampling(tiny_run, tmp_path, capsys):
    pngs, args = str(tmp_path / "pngs"), [tiny_run, "--n", "3", "--steps", "2", "--out", str(tmp_path / "g.png")]
    sample.main([*args, "--out-dir", pngs])
    r = cli(capsys, sample.main, [*args, "--n", "2", "--out-dir", pngs])
    one_line_error(r, f"--out-dir {pngs} already holds 3 numbered PNGs")
    if sys.platform.startswith("linux"):
        full = str(tmp_path / "full")
        r = limited_run(100, "sample.py", *args, "--out-dir", full)
        one_line_error(r, "cannot write", full, "--out-dir")
        assert os.listdir(full) == []  # no empty files for an FID tool to read


def test_sample_checks_its_outputs_before_sampling(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(train_args(faces, out, "--max-steps", "1"))
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    for argv, words in [([out, "--out", str(tmp_path / "x.txt")], ["'.txt'", "not an image format"]),
                        ([out, "--out", str(tmp_path)], ["is a folder"]),
                        ([str(tmp_path / "empty")], ["is a folder without a ckpt.pt"])]:
        code, stdout, err = main_error(capsys, sample.main, argv + ["--n", "2", "--steps", "2"])
        assert code == 2 and err.count("\n") == 1 and all(w in err for w in words) and "images/s" not in stdout, err
    sample.main([out, "--n", "2", "--steps", "2", "--out", str(tmp_path / "grid.jpg")])  # the folder means its ckpt.pt
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"


def test_bad_checkpoints_get_one_line_errors(faces, tmp_path, capsys):
    (tmp_path / "corrupt.pt").write_bytes(os.urandom(1000))
    torch.save({"weights": torch.zeros(2)}, str(tmp_path / "foreign.pt"))
    torch.save({"format": "ddpm-faces-checkpoint-v9"}, str(tmp_path / "later.pt"))
    os.symlink(str(tmp_path / "loop.pt"), str(tmp_path / "loop.pt"))
    for name, message in [("missing.pt", "not found"), ("corrupt.pt", "not a readable"), ("foreign.pt", "not written by"),
                          ("later.pt", "written by another version of this project (its marker is 'ddpm-faces-checkpoint-v9'"),
                          ("loop.pt", "is not a regular file"), (os.devnull, "is not a regular file")]:
        code, _, err = main_error(capsys, sample.main, [str(tmp_path / name)])
        assert code == 2 and message in err and err.count("\n") == 1, err
    r = cli(capsys, train.main, [*train_args(faces, str(tmp_path / "x"), "--resume", str(tmp_path / "corrupt.pt"))])
    one_line_error(r, "not a readable")  # and as a real command line: no traceback


def test_a_checkpoint_damaged_after_it_was_written_is_refused(tiny_run, tmp_path, capsys):
    good = util.load_checkpoint(tiny_run)
    torch.save(dict(good, step=-5), str(tmp_path / "meta.pt"))  # a setting edited: its checksum no longer holds
    util.save_checkpoint(dict(good, step=-5), str(tmp_path / "edited.pt"))  # edited and checksummed again
    raw = bytearray(open(os.path.join(tiny_run, "ckpt.pt"), "rb").read())
    at = bytes(raw).find(good["ema"]["conv_in.bias"].numpy().tobytes())  # one bit of the EMA weights flipped
    raw[at + 5] ^= 1
    open(tmp_path / "flipped.pt", "wb").write(raw)
    for name, words in [("edited.pt", "its step -5 is not a count of steps"), ("flipped.pt", "its ema tensors fail their checksum"),
                        ("meta.pt", "its settings, configs or counters fail their checksum")]:
        for main, args in [(sample.main, ["--n", "1", "--out", str(tmp_path / "s.png")]), (train.main, ["--max-steps", "9"])]:
            r = cli(capsys, main, [str(tmp_path / name), *args] if main is sample.main else ["--resume", str(tmp_path / name), *args])
            one_line_error(r, words)


def test_broken_checkpoints_are_refused_on_resume_and_sampling(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(train_args(faces, out, "--max-steps", "1"))
    good = util.load_checkpoint(out)
    cases = {"no_ema": {k: v for k, v in good.items() if k != "ema"},
             "wrong_model": dict(good, model_args=dict(good["model_args"], ch=8)),
             "nan_ema": dict(good, ema={k: v * float("nan") for k, v in good["ema"].items()})}
    for name, ckpt in cases.items():
        path = str(tmp_path / f"{name}.pt")
        util.save_checkpoint(ckpt, path)  # checksummed again: the checks of their sense must catch each
        for main, argv in ((train.main, ["--resume", path, "--out", str(tmp_path / name)]), (sample.main, [path, "--out", str(tmp_path / "s.png")])):
            code, _, err = main_error(capsys, main, argv)
            words = {"no_ema": "lacks its ema entry, so the file was damaged", "wrong_model": "do not fit the model",
                     "nan_ema": "not finite"}[name]
            assert code == 2 and err.count("\n") == 1 and words in err, (name, err)
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save(dict(good, ema=Evil()), str(tmp_path / "evil.pt"))
    code, out, err = main_error(capsys, sample.main, [str(tmp_path / "evil.pt")])
    assert code == 2 and "refused as unsafe" in err and "system" in err and "pwned" not in out, err


def test_a_model_of_few_timesteps_samples_with_every_default(faces, tmp_path, capsys):
    # T = 10 is fewer than the default 20 steps: the default takes all T, and --sampler ddpm never minds --steps
    out = str(tmp_path / "run")
    train.main([a if a != "50" else "10" for a in train_args(faces, out, "--max-steps", "1")])
    for extra, said in ([], "ddim with 10 steps"), (["--sampler", "ddpm"], "ddpm with 10 steps"):
        sample.main([out, "--n", "1", *extra, "--out", str(tmp_path / "s.png")])
        assert said in capsys.readouterr().out
    code, _, err = main_error(capsys, sample.main, [out, "--steps", "11", "--out", str(tmp_path / "s.png")])
    assert code == 2 and "T=10" in err


def test_sampler_and_editing_flag_errors(tiny_run, faces, tmp_path, capsys):
    init = os.path.join(faces, "003.png")
    for extra, words in [(["--strength", "0.5"], "--init IMAGE"), (["--init", init, "--strength", "1.5"], "must be in [0, 1]"),
                         (["--init", str(tmp_path / "nope.png")], "no such file"), (["--interpolate", "4", "--init", init], "--init does not apply to --interpolate"),
                         (["--interpolate", "4", "--sampler", "ddpm"], "deterministic sampler"), (["--interpolate", "1"], "must be >= 2"),
                         (["--sampler", "ddpm", "--steps", "10"], "ddpm takes all T steps"), (["--spacing", "time"], "drop --spacing"),
                         (["--var", "posterior"], "drop --var"), (["--sampler", "dpm++", "--eta", "0"], "drop --eta"),
                         (["--init", __file__], "not an image")]:
        code, _, err = main_error(capsys, sample.main, [tiny_run, "--out", str(tmp_path / "x.png"), *extra])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_sdedit_at_strength_zero_gives_back_the_preprocessed_image(tiny_run, faces, tmp_path, capsys):
    init = os.path.join(faces, "003.png")
    sample.main([tiny_run, "--init", init, "--strength", "0", "--n", "2", "--out", str(tmp_path / "s.png"), "--out-dir", str(tmp_path / "s")])
    assert "SDEdit of" in capsys.readouterr().out
    want = data.preprocess(init, 16, "auto")
    assert all(torch.equal(torchvision.io.read_image(str(tmp_path / "s" / f"00000{i}.png")), want) for i in range(2))


def test_interpolation_runs_from_one_seeds_sample_to_the_next(tiny_run, tmp_path, capsys):
    # the first frame is the --seed sample itself, the last is --seed + 1's (DDIM eta 0)
    sample.main([tiny_run, "--interpolate", "5", "--seed", "4", "--out", str(tmp_path / "i.png"), "--out-dir", str(tmp_path / "i")])
    assert "eta 0" in capsys.readouterr().out
    for seed, frame in ((4, 0), (5, 4)):
        sample.main([tiny_run, "--n", "1", "--eta", "0", "--seed", str(seed), "--out", str(tmp_path / "one.png"), "--out-dir", str(tmp_path / f"one{seed}")])
        a = torchvision.io.read_image(str(tmp_path / f"one{seed}" / "000000.png")).int()
        b = torchvision.io.read_image(str(tmp_path / "i" / f"00000{frame}.png")).int()
        assert (a - b).abs().max() <= 1  # the same x_T, up to the float rounding of the interpolation
    assert torchvision.io.read_image(str(tmp_path / "i.png")).shape[1:] == (18 + 2, 5 * 18 + 2)  # one row of 5


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_attributes_are_asked_for_with_every_sampler(cond_run, tmp_path, capsys, sampler):
    sample.main([cond_run[0], "--attrs", "Smiling=1,Young=0", "--guidance", "2", "--sampler", sampler,
                 *(["--steps", "3"] if sampler != "ddpm" else []), "--n", "2", "--out", str(tmp_path / "g.png")])
    assert "Smiling=1,Young=0 with guidance 2" in capsys.readouterr().out and os.path.exists(tmp_path / "g.png")


def test_compare_draws_each_face_without_then_with_the_attribute(cond_run, tmp_path):
    sample.main([cond_run[0], "--compare", "Smiling", "--n", "3", "--steps", "3", "--out", str(tmp_path / "cmp.png"), "--out-dir", str(tmp_path / "cmp")])
    assert len(os.listdir(tmp_path / "cmp")) == 6 and torchvision.io.read_image(str(tmp_path / "cmp.png")).shape[1:] == (2 * 18 + 2, 3 * 18 + 2)
    without, with_ = [torch.stack([torchvision.io.read_image(str(tmp_path / "cmp" / f"00000{i}.png")) for i in r]) for r in ((0, 1, 2), (3, 4, 5))]
    assert not torch.equal(without, with_)  # the same noise, another condition


def test_inpainting_keeps_the_known_pixels_exactly(cond_run, tmp_path, capsys):
    init = os.path.join(cond_run[1], "celeba", "img_align_celeba", "000005.jpg")
    sample.main([cond_run[0], "--init", init, "--mask", "center", "--steps", "10", "--jump-length", "3", "--jump-n-sample", "2", "--n", "2",
                 "--attrs", "Smiling=1", "--out", str(tmp_path / "inp.png"), "--out-dir", str(tmp_path / "inp")])
    assert "RePaint inpainting" in capsys.readouterr().out
    want = data.preprocess(init, 16, "auto")
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[4:12, 4:12] = False
    for i in range(2):
        got = torchvision.io.read_image(str(tmp_path / "inp" / f"00000{i}.png"))
        assert torch.equal(got[:, keep], want[:, keep]) and not torch.equal(got, want)
    grid = torchvision.io.read_image(str(tmp_path / "inp.png"))  # the input, its hole grey, then the two fillings
    assert grid.shape[2] == 3 * 18 + 2 and torch.equal(grid[:, 2:18, 2:18][:, keep], want[:, keep])
    mask_png = str(tmp_path / "mask.png")  # a mask drawn at another size than the image: said, as the two are resized apart
    Image.new("L", (16, 16), 255).save(mask_png)
    sample.main([cond_run[0], "--init", init, "--mask", mask_png, "--steps", "4", "--jump-n-sample", "1", "--n", "1", "--out", str(tmp_path / "m.png")])
    assert "note: --mask" in capsys.readouterr().out


def test_attribute_and_inpainting_flag_errors(cond_run, tiny_run, tmp_path, capsys):
    init = os.path.join(cond_run[1], "celeba", "img_align_celeba", "000005.jpg")
    black = str(tmp_path / "black.png")
    Image.new("L", (16, 16), 0).save(black)
    for extra, words in [(["--attrs", "Nose=1"], "it knows Smiling,Young"), (["--attrs", "Smiling=yes"], "NAME=1"),
                         (["--attrs", "Smiling=1,Smiling=0"], "twice"), (["--compare", "Smiling", "--attrs", "Smiling=1"], "do not set it in --attrs"),
                         (["--guidance", "3"], "add --prompt"), (["--mask", "eyes"], "--init IMAGE"),
                         (["--init", init, "--mask", "nose"], "neither a region"), (["--init", init, "--mask", black], "no white pixels"),
                         (["--init", init, "--mask", "top", "--strength", "0.5"], "--strength does not apply to RePaint"),
                         (["--init", init, "--mask", "top", "--sampler", "dpm++"], "RePaint takes its own steps"),
                         (["--jump-length", "5"], "inpaints")]:
        code, _, err = main_error(capsys, sample.main, [cond_run[0], "--out", str(tmp_path / "x.png"), *extra])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (extra, err)
    code, _, err = main_error(capsys, sample.main, [tiny_run, "--attrs", "Smiling=1", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "unconditional model" in err


CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
                "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
                "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
                "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
                "Wearing_Necktie Young").split()


def test_prompt_reaches_every_celeba_attribute_by_name_and_by_its_phrases():
    for name in CELEBA_ATTRS:  # the attribute's own name, in words
        assert sample.parse_prompt(name.replace("_", " "))[0] == {name: 1}, name
    targets = {a for a, _ in sample.phrases().values()}
    assert targets == set(CELEBA_ATTRS)  # every attribute has phrasings of its own too
    asked = sample.parse_prompt("a smiling blond woman with glasses, bearded, old")[0]
    assert asked == {"Smiling": 1, "Blond_Hair": 1, "Male": 0, "Eyeglasses": 1, "No_Beard": 0, "Young": 0}


def test_prompt_negation_unknown_words_and_conflicts():
    asked, understood, ignored = sample.parse_prompt("A man without a beard, not smiling, no hat and wearing a tie; isn't blurry")
    assert asked == {"Male": 1, "No_Beard": 1, "Smiling": 0, "Wearing_Hat": 0, "Wearing_Necktie": 1, "Blurry": 0}, asked
    assert understood["Wearing_Hat"] == "no ... hat" and ignored == []
    assert sample.parse_prompt("no glasses and a smile")[0] == {"Eyeglasses": 0, "Smiling": 1}  # the negation ends with its clause
    assert sample.parse_prompt("no beard")[0] == {"No_Beard": 1}  # CelebA's own name is not negated twice
    assert sample.parse_prompt("not not smiling")[0] == {"Smiling": 1}  # two negations cancel
    assert sample.parse_prompt("never without glasses")[0] == {"Eyeglasses": 1}
    assert sample.parse_prompt("a pretty purple dragon with glasses") == ({"Eyeglasses": 1}, {"Eyeglasses": "glasses"}, ["pretty", "purple", "dragon"])
    for text in ("a man and a woman", "smiling but serious", "young and old"):
        with pytest.raises(util.UsageError, match="both ways"):
            sample.parse_prompt(text)


def test_prompt_cli_says_what_it_understood_and_refuses_what_it_cannot_do(cond_run, tmp_path, capsys):
    sample.main([cond_run[0], "--prompt", "a smiling young face, lovely", "--steps", "3", "--n", "2", "--out", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "understood Smiling=1 ('smiling'), Young=1 ('young'); ignored 'lovely'" in out and "Smiling=1,Young=1 with guidance 3" in out
    for argv, words in [([cond_run[0], "--prompt", "a purple dragon"], "no word of it names"),
                        ([cond_run[0], "--prompt", "a smiling man"], "'man' asks for Male, which this model was not trained on"),
                        ([cond_run[0], "--prompt", "smiling", "--attrs", "Young=1"], "use one of them")]:
        code, _, err = main_error(capsys, sample.main, [*argv, "--out", str(tmp_path / "x.png")])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_figure_attention_draws_where_each_query_looks(tiny_run, tmp_path):
    opt = sample.check_flags(*sample.make_parser().parse([tiny_run, "--steps", "6", "--out", str(tmp_path / "unused.png")]))
    job = sample.load(opt, set(), torch.device("cpu"), contextlib.nullcontext())
    x_T = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    face, maps = sample.attention_maps(job, x_T, [49, 0])
    assert face.shape == (1, 3, 16, 16) and maps.shape == (3, 2, 8, 8)  # 3 queries, 2 timesteps, the 8x8 attention maps
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(3, 2))  # each a distribution over the positions
    out = str(tmp_path / "attn.png")
    sample.main([tiny_run, "--figure", "attention", "--steps", "6", "--out", out])
    t = TF.pil_to_tensor(Image.open(out).convert("RGB")).int()
    redness = t[0] - (t[1] + t[2]) // 2
    left = 8 + 7 * len("background")
    cell = lambda row, col: redness[16 + row * 130 + 2: 16 + row * 130 + 130, left + col * 130 + 2: left + col * 130 + 130]
    assert cell(0, 1).float().mean() > cell(0, 0).float().mean() + 20  # the maps are drawn in red over the plain face


def grid_face(path, row, col, size=16, scale=4, left=8 + 7 * 6):
    """The face at (row, col) of a figure drawn by face_grid (2-pixel padding, enlarged `scale` times, 16 px of
    labels on top and `left` on the left), read back at its own size: (3, size, size) uint8."""
    t = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    y, x = 16 + scale * (2 + row * (size + 2)), left + scale * (2 + col * (size + 2))
    return t[:, y + scale // 2: y + scale * size: scale, x + scale // 2: x + scale * size: scale]


def test_figure_forward_shows_the_face_turning_into_noise(tiny_run, faces, tmp_path):
    init, out = os.path.join(faces, "001.png"), str(tmp_path / "fwd.png")
    sample.main([tiny_run, "--figure", "forward", "--init", init, "--out", out])  # 3 schedules x 7 timesteps, 16 px drawn at 64
    face = data.preprocess(init, 16, "auto").int()
    left = 8 + 7 * len("sigmoid")
    for row in range(3):
        first, last = grid_face(out, row, 0, left=left).int(), grid_face(out, row, 6, left=left).int()
        assert (first - face).abs().float().mean() < 10  # t = 0: the face, a trace of noise on it
        assert (last - face).abs().float().mean() > 40  # t = 999: noise, hardly the face at all
    middle = [grid_face(out, row, 4, left=left).int() for row in range(3)]  # t = 500: the schedules differ there
    assert (middle[0] - middle[1]).abs().float().mean() > 5
    sample.main([tiny_run, "--figure", "forward", "--out", str(tmp_path / "own.png")])  # the model's own face
    assert Image.open(tmp_path / "own.png").size == Image.open(out).size


def test_figure_reverse_ends_at_the_sample_and_writes_every_step_as_a_gif(tiny_run, tmp_path):
    out = str(tmp_path / "rev.png")
    sample.main([tiny_run, "--figure", "reverse", "--n", "2", "--steps", "15", "--seed", "7", "--out", out])
    sample.main([tiny_run, "--n", "2", "--steps", "15", "--seed", "7", "--out", str(tmp_path / "s.png"), "--out-dir", str(tmp_path / "s")])
    for i in range(2):  # the last column of face i's pair of rows is its sample, drawn from the same noise as sample.py's
        want = torchvision.io.read_image(str(tmp_path / "s" / f"00000{i}.png"))
        assert torch.equal(grid_face(out, 2 * i, 10), want) and torch.equal(grid_face(out, 2 * i + 1, 10), want)
    x_T = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(7))  # the first column: the starting noise
    assert all(torch.equal(grid_face(out, 2 * i, 0), data.to_uint8(x_T)[i]) for i in range(2))
    gif = Image.open(tmp_path / "rev.gif")
    assert gif.n_frames == 16 and gif.is_animated  # every step, then the sample
    # --out naming the animation: the strip goes beside it, not under it
    sample.main([tiny_run, "--figure", "reverse", "--n", "1", "--steps", "3", "--out", str(tmp_path / "anim.gif")])
    assert Image.open(tmp_path / "anim.gif").n_frames == 4 and Image.open(tmp_path / "anim.png").format == "PNG"


def chart_colours(path):
    """The set of RGB colours in a chart."""
    return {tuple(c) for c in TF.pil_to_tensor(Image.open(path).convert("RGB")).flatten(1).T.tolist()}


def test_figure_schedules_draws_a_curve_per_schedule(tiny_run, tmp_path):
    for argv in ([tiny_run], []):  # the checkpoint's T, or T = 1000 without one
        sample.main([*argv, "--figure", "schedules", "--out", str(tmp_path / "sched.png")])
        colours = chart_colours(tmp_path / "sched.png")
        assert {(31, 119, 180), (214, 39, 40), (44, 160, 44)} <= colours  # linear, cosine, sigmoid


def test_figure_loss_draws_the_runs_training_and_validation_loss(tiny_run, tmp_path, capsys):
    sample.main([tiny_run, "--figure", "loss", "--out", str(tmp_path / "loss.png")])
    assert {(31, 119, 180), (214, 39, 40)} <= chart_colours(tmp_path / "loss.png")  # train, val
    for extra, words in [(["--figure", "loss"], "log.csv"), ([tiny_run, "--figure", "reverse", "--init", __file__], "--init does not apply to --figure reverse"),
                         ([tiny_run, "--figure", "forward", "--interpolate", "3"], "--interpolate does not apply to --figure forward"),
                         ([str(tmp_path), "--figure", "loss"], "no ")]:
        code, _, err = main_error(capsys, sample.main, [*extra, "--out", str(tmp_path / "x.png")])
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_training_step_runs_in_few_project_lines_most_of_them_in_the_model_files(faces, tmp_path, monkeypatch):
    # every project line that one steady-state step of a tiny model runs (no log, grid, evaluation or checkpoint
    # due), traced from the end of step 3 to the end of step 4: the step reads in train.py, diffusion.py, unet.py
    # and data.py, not in plumbing
    files = {os.path.join(HERE, f): f for f in ("train.py", "diffusion.py", "unet.py", "data.py", "util.py", "autoencoder.py",
                                                "budget.py", "settings.py")}
    lines = set()
    def tracer(frame, event, arg):
        name = files.get(frame.f_code.co_filename)
        if name is None:
            return None  # torch's own lines are not the reader's
        if event == "line":
            lines.add((name, frame.f_lineno))
        return tracer
    real = train.after_step
    def after_step(cfg, env, run, loss):
        code = real(cfg, env, run, loss)
        if run.step == 3:
            sys._getframe(1).f_trace = tracer  # the loop's own frame
            sys.settrace(tracer)
        elif run.step == 4:
            sys.settrace(None)
            sys._getframe(1).f_trace = None
        return code
    monkeypatch.setattr(train, "after_step", after_step)
    train.main(train_args(faces, str(tmp_path / "run"), "--max-steps", "6", "--log-every", "100"))
    per_file = {f: sum(1 for name, _ in lines if name == f) for f in files.values()}
    model_files = sum(per_file[f] for f in ("train.py", "diffusion.py", "unet.py", "data.py", "autoencoder.py"))
    assert 60 <= len(lines) <= 132 and model_files >= 0.95 * len(lines), per_file  # (2: the ControlNet's hook, its baseline's)


# -----------------------------------------------------------------------------
# what a careless or unlucky user meets: Ctrl-C at once, a busy laptop, budgets, words


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_ctrl_c_while_torch_loads_is_one_line(script, tmp_path):
    # a user who started the wrong command presses Ctrl-C at once, while the imports still run
    p = subprocess.Popen([sys.executable, script, "--out", str(tmp_path / ("o" if script == "train.py" else "o.png"))],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err and err.count("\n") == 1 and "interrupted" in err, err


def test_threads_follow_a_program_that_starts_during_the_run(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    busy = [0.0]
    monkeypatch.setattr(budget.CpuLoad, "others", lambda self: busy[0])
    said = []
    load = budget.CpuLoad()
    torch.set_num_threads(2)
    try:
        assert budget.set_threads(torch.device("cpu"), 1, said.append, load) == 2 and said == []  # idle: as it was
        busy[0] = 1.0  # the browser starts
        assert budget.set_threads(torch.device("cpu"), 1, said.append, load) == 1
        assert said == ["threads: 2 -> 1 per process, other programs now keeping 1 of 2 cores busy (OMP_NUM_THREADS=N chooses)"]
        busy[0] = 0.1  # and ends
        assert budget.set_threads(torch.device("cpu"), 1, said.append, load) == 2 and len(said) == 2
        busy[0] = 0.67  # a busy loop's share of 2 cores while this run's 2 threads compete with it
        assert budget.set_threads(torch.device("cpu"), 1, said.append, load) == 1 and len(said) == 3
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))


def test_the_cpu_load_reader_sees_another_process_not_its_own():
    if budget.CpuLoad.read() is None:
        pytest.skip("no /proc")
    # Other programs may run beside the tests: compare with a reading while this process sleeps, and allow
    # their load to move between the two readings (three tries). Counting its own core would add 1.
    readings = []
    for _ in range(3):
        load = budget.CpuLoad()
        time.sleep(0.3)
        idle = load.others()
        t0 = time.time()
        while time.time() - t0 < 0.3:  # this process keeps a core busy: not another program's load
            pass
        readings.append((idle, load.others()))
        if readings[-1][1] < readings[-1][0] + 0.5:
            break
    assert readings[-1][1] < readings[-1][0] + 0.5, readings


def test_a_replanned_budget_keeps_its_grids_evenly_spaced_and_counts_from_the_process_start(faces, tmp_path, monkeypatch):
    # 0.25 s a step, then 0.5 s from step 100: the plan moves after the first grid is drawn. And 10 s went to
    # the imports before main(): the run still ends within the minute from the process's start.
    now = fake_clock(monkeypatch, lambda step: 0.25 if step < 100 else 0.5)
    out = str(tmp_path / "run")
    args = train_args(faces, out, "--minutes", "1.25", "--log-every", "10", "--sample-steps", "2", "--sample-n", "4")
    del args[args.index("--sample-every"):args.index("--sample-every") + 2]
    train.main(args, started=-10.0)
    grids = sorted(int(f[8:15]) for f in os.listdir(out) if f.startswith("samples_"))
    gaps = [b - a for a, b in zip([0] + grids, grids)]
    assert len(grids) == 4 and min(gaps) >= 0.4 * max(gaps), grids  # no two crowded together
    assert 0.9 * 65 <= now[0] <= 65, now[0]


def test_a_checkpoint_step_beyond_its_plan_is_damage(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(train_args(faces, out, "--max-steps", "2"))
    ckpt = util.load_checkpoint(out)
    util.save_checkpoint(dict(ckpt, step=10**12), os.path.join(out, "ckpt.pt"))
    one_line_error(cli(capsys, train.main, ["--resume", "--out", out]), "is beyond the 2 steps its run planned")


def test_sampling_a_checkpoint_whose_optimizer_is_damaged_says_it_cannot_be_resumed(tiny_run, tmp_path, capsys):
    ckpt = util.load_checkpoint(tiny_run)
    state = ckpt["optimizer"]["state"]
    state[0]["exp_avg"] = state[0]["exp_avg"] + 1  # changed after the checksum was taken
    path = str(tmp_path / "damaged.pt")
    torch.save(ckpt, path)
    r = cli(capsys, sample.main, [path, "--n", "1", "--steps", "2", "--out", str(tmp_path / "s.png")])
    assert r.returncode == 0 and r.stdout.count("cannot be resumed") == 1, r.stdout
    one_line_error(cli(capsys, train.main, ["--resume", path, "--out", str(tmp_path / "o")]), "optimizer tensors fail their checksum")


def test_sampling_says_where_each_output_went(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli(capsys, sample.main, [tiny_run, "--n", "3", "--steps", "2", "--out-dir", "gen"])
    assert r.returncode == 0 and f"wrote {tmp_path / 'samples.png'} and 3 numbered PNGs in {tmp_path / 'gen'}" in r.stdout, r.stdout


def test_data_check_refuses_a_size_beyond_the_memory(faces, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(budget, "device_memory", lambda device: 2**17)
    code, _, err = main_error(capsys, data.main, ["--data", faces, "--size", "80", "--cache-dir", str(tmp_path)])
    assert code == 2 and "23 images at 80x80 take 0.4 MiB decoded, more than the 0.1 MiB of memory available" in err, err
    assert err.count("\n") == 1, err


# -----------------------------------------------------------------------------
# latent diffusion: autoencoder.py, the latents, and the two stages end to end


def tiny_ae(factor=4, size=16):
    return autoencoder.Autoencoder(autoencoder.AutoencoderConfig(image_size=size, factor=factor, ch=8, num_res_blocks=1))


@pytest.mark.parametrize("factor", autoencoder.FACTORS)
def test_autoencoder_shapes_for_every_factor(factor):
    m = perturbed(tiny_ae(factor))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = m.encode(x)
    mean = posterior.mode()
    assert mean.shape == posterior.logvar.shape == (2, 4, 16 // factor, 16 // factor)
    x_hat, posterior2 = m(x, torch.zeros_like(mean))
    assert x_hat.shape == x.shape and torch.equal(mean, posterior2.mean)
    assert torch.equal(posterior.sample(torch.zeros_like(mean)), mean)
    torch.testing.assert_close(x_hat, m.decode(mean))  # zero noise: z is the posterior mean
    assert len(m.cfg.ch_mult) == {2: 2, 4: 3, 8: 4}[factor]  # log2(f) downsamplings


def test_kl_term_is_the_closed_form_and_the_loss_adds_it_with_its_weight():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                              torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(autoencoder.kl_divergence(mean, logvar), exact)
    assert torch.all(autoencoder.kl_divergence(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)) == 0)  # q = prior
    m = perturbed(tiny_ae())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 4, 4, 4, generator=g)
    x_hat, posterior = m(x, noise)
    l1 = (x - x_hat).abs().mean((1, 2, 3))
    kl = autoencoder.kl_divergence(posterior.mean, posterior.logvar)
    torch.testing.assert_close(posterior.kl(), kl)
    torch.testing.assert_close(autoencoder.training_losses(m, x, noise, 0.0), l1)
    torch.testing.assert_close(autoencoder.training_losses(m, x, noise, 0.5), l1 + 0.5 * kl / x[0].numel())


def test_scale_factor_brings_the_latents_to_unit_variance_and_psnr_is_the_textbook_one():
    z = 3.0 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(1)) + 0.5
    s = autoencoder.scale_factor(z)
    assert s == pytest.approx(1 / 3, rel=0.05) and (z * s).std().item() == pytest.approx(1.0, abs=1e-6)
    x = torch.zeros(1, 3, 4, 4)
    assert autoencoder.psnr(x + 0.2, x).item() == pytest.approx(10 * math.log10(4 / 0.04))  # peak-to-peak range 2


def test_latent_batches_are_flipped_posteriors_and_the_same_on_any_number_of_gpus():
    n, g = 8, torch.Generator().manual_seed(2)
    post = torch.randn(n, 2, 8, 2, 2, generator=g).half()  # (N, [image, mirror], mean and logvar of 4 channels, 2, 2)
    means = post[:, :, :4].contiguous()  # the cache without --posterior sample: the means alone
    one = data.LatentBatches(means, 4, "cpu", seed=3, scale=2.0)
    x, _ = one.get(0, torch.Generator().manual_seed(7))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:4]
    flip = torch.rand(4, generator=torch.Generator().manual_seed(7)) < 0.5
    assert one.shape == (4, 2, 2) and torch.equal(x, 2.0 * post[perm, flip.long(), :4].float())  # the mirror's mean
    for sample_, cache in ((False, means), (True, post)):
        b1 = data.LatentBatches(cache, 4, "cpu", seed=3, sample=sample_).get(5, torch.Generator().manual_seed(9))[0]
        halves = [data.LatentBatches(cache, 4, "cpu", seed=3, rank=r, world=2, sample=sample_).get(5, torch.Generator().manual_seed(9))[0]
                  for r in (0, 1)]
        assert torch.equal(torch.cat(halves), b1)
    assert not torch.equal(b1, data.LatentBatches(means, 4, "cpu", seed=3).get(5, torch.Generator().manual_seed(9))[0])


def fake_encoder(k, calls):
    """An 'autoencoder' (f = 4, one channel) whose posterior mean is k times a pixel of each 4x4 patch."""
    def encode(x):
        calls.append(len(x))
        mean = x[:, :1, ::4, ::4] * k
        return mean, torch.full_like(mean, -2.0)
    return encode


def test_the_latent_cache_is_lean_built_once_per_autoencoder_and_images_and_continued(faces, tmp_path, monkeypatch):
    faces = str(shutil.copytree(faces, tmp_path / "faces"))  # its files are touched below
    cache = str(tmp_path / "cache")
    calls, said = [], []
    def latents(k, key, **kw):
        return data.encode_latents(faces, 16, "auto", cache, fake_encoder(k, calls), key, log=said.append, **kw)
    a = latents(1.0, "aaaa")
    images = data.load(faces, 16, "train", "auto", cache, log=quiet)  # the split is small: decoded through the pixel cache
    n = len(images["images"])
    x = a["latents"]
    assert x.shape == (n, 2, 1, 4, 4) and x.dtype == torch.float16 and sum(calls) == 2 * n  # both views, 16-bit means
    assert os.path.getsize(glob_one(cache, "*-latents-aaaa-flip.bin")) == n * 2 * 16 * 2  # 64 bytes per image
    by_name = {f: i for i, f in enumerate(images["files"])}
    order = [by_name[f] for f in a["files"]]  # the cache's order: a fixed permutation of the split
    assert sorted(order) == list(range(n)) and order != list(range(n))
    pixels = data.to_float(images["images"][order], "cpu")[:, :1]
    torch.testing.assert_close(x[:, 1].float(), pixels.flip(3)[:, :, ::4, ::4], atol=1e-3, rtol=0)  # the mirror's
    z = x[:, 0].double()  # the streaming scale factor is the one of all the latents at once
    assert autoencoder.scale_factor_of(*a["stats"]) == pytest.approx(autoencoder.scale_factor(z), rel=1e-9)
    calls.clear()
    assert torch.equal(latents(1.0, "aaaa")["latents"], x) and not calls  # cached
    b = latents(2.0, "bbbb")  # another autoencoder: its own cache
    assert calls and torch.allclose(b["latents"].float(), 2 * x.float(), atol=2e-3)
    assert latents(1.0, "cccc", flip=False)["latents"].shape[1] == 1  # no flips: one view
    assert latents(1.0, "dddd", logvar=True)["latents"].shape[2] == 2  # --posterior sample: the log-variance too
    # a budget of no time encodes nothing more: the 5 of a first run of --count 5, then a later run continues
    calls.clear()
    part = latents(3.0, "eeee", count=5)
    assert len(part["latents"]) == 5 and sum(calls) == 2 * 5 and part["files"] == a["files"][:5]
    calls.clear()
    assert len(latents(3.0, "eeee", seconds=0)["latents"]) == 5 and not calls
    whole = latents(3.0, "eeee")
    assert len(whole["latents"]) == n and sum(calls) == 2 * (n - 5) and torch.equal(whole["latents"][:5], part["latents"])
    # a damaged cache is rebuilt; images changed since: its cache is stale
    path = glob_one(cache, "*-latents-aaaa-flip.bin")
    raw = bytearray(open(path, "rb").read())
    raw[10] ^= 1
    open(path, "wb").write(raw)
    calls.clear()
    latents(1.0, "aaaa")
    assert calls and any("corrupt" in line for line in said)
    os.utime(os.path.join(faces, sorted(os.listdir(faces))[0]))
    calls.clear()
    latents(1.0, "aaaa")
    assert calls and any("stale" in line for line in said)
    # a split too large for a pixel cache streams its images into a cache folder made on the way
    monkeypatch.setattr(data, "SMALL_SPLIT", 0)
    new = str(tmp_path / "new" / "cache")
    streamed = data.encode_latents(faces, 16, "auto", new, fake_encoder(1.0, []), "aaaa", log=quiet)
    rebuilt = latents(1.0, "aaaa")["latents"]  # (x, memory-mapped, saw the damage above)
    assert torch.equal(streamed["latents"], rebuilt) and not glob.glob(os.path.join(new, "faces-train-*.pt"))  # no pixels kept


def glob_one(folder, pattern):
    import glob
    found = glob.glob(os.path.join(folder, pattern))
    assert len(found) == 1, (pattern, os.listdir(folder))
    return found[0]


AE_TINY = ["--size", "16", "--ch", "8", "--num-res-blocks", "1", "--batch-size", "4", "--warmup", "2", "--log-every", "1",
           "--sample-every", "0", "--eval-every", "0", "--ckpt-every", "0", *CPU, "--seed", "5"]
LDM_TINY = ["--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "4", "--timesteps", "50",
            "--batch-size", "4", "--warmup", "2", "--log-every", "1", "--sample-every", "0", "--eval-every", "0",
            "--ckpt-every", "0", *CPU, "--seed", "5"]


@pytest.fixture(scope="module")
def latent_run(faces, tmp_path_factory):
    """A tiny autoencoder (f = 4: 16x16 faces as 4x4x4 latents), then a tiny DDPM on its latents. -> (the
    autoencoder's --out, the latent run's --out, the cache folder)."""
    root = tmp_path_factory.mktemp("latent")
    cache = str(root / "cache")
    ae, ldm = str(root / "ae"), str(root / "ldm")
    train.main(["--data", faces, "--cache-dir", cache, "--out", ae, "--autoencoder", *AE_TINY, "--max-steps", "3",
                "--eval-every", "3", "--sample-every", "3", "--sample-n", "4"])
    train.main(["--data", faces, "--cache-dir", cache, "--out", ldm, "--latents", ae, *LDM_TINY, "--max-steps", "3",
                "--eval-every", "3", "--sample-every", "3", "--sample-n", "4", "--sample-steps", "2"])
    return ae, ldm, cache


def test_latent_diffusion_trains_its_two_stages_and_samples_from_one_file(latent_run, faces, tmp_path, capsys):
    ae, ldm, cache = latent_run
    a, l = util.load_checkpoint(ae), util.load_checkpoint(ldm)
    assert a["args"]["autoencoder"] and a["model_args"]["factor"] == 4 and a["step"] == 3
    assert l["model_args"]["in_channels"] == 4 and l["model_args"]["image_size"] == 4  # the latent U-Net
    assert l["autoencoder_args"]["scale_factor"] > 0 and set(l["autoencoder"]) == set(a["ema"])  # it carries the decoder
    # the one validation face above its reconstruction
    assert Image.open(os.path.join(ae, "samples_0000003.png")).size == (1 * 18 + 2, 2 * 18 + 2)
    assert Image.open(os.path.join(ldm, "samples_0000003.png")).size == (2 * 18 + 2, 2 * 18 + 2)  # decoded 16x16 faces
    moved = str(tmp_path / "only.pt")
    shutil.copy(os.path.join(ldm, "ckpt.pt"), moved)  # the diffusion checkpoint alone
    r = cli(capsys, sample.main, [moved, "--n", "3", "--steps", "3", "--out", str(tmp_path / "s.png"), "--out-dir", str(tmp_path / "gen")])
    assert r.returncode == 0 and "a latent model" in r.stdout, r.stderr
    assert sorted(os.listdir(tmp_path / "gen")) == ["000000.png", "000001.png", "000002.png"]
    assert torchvision.io.read_image(str(tmp_path / "gen" / "000000.png")).shape == (3, 16, 16)
    # the autoencoder's own checkpoint: its reconstructions of validation images, with their PSNR
    r = cli(capsys, sample.main, [ae, "--n", "2", "--out", str(tmp_path / "r.png"), "--out-dir", str(tmp_path / "rec"),
                                  "--cache-dir", cache])
    assert r.returncode == 0 and "PSNR" in r.stdout and len(os.listdir(tmp_path / "rec")) == 1, r.stdout  # 1 valid image


def test_every_sampling_mode_decodes_a_latent_model(latent_run, faces, tmp_path, capsys):
    _, ldm, _ = latent_run
    face = os.path.join(faces, "000.png")
    for extra, n in [(["--init", face, "--strength", "0.5", "--steps", "3"], 2), (["--interpolate", "3", "--steps", "3"], 3),
                     (["--init", face, "--mask", "center", "--steps", "4", "--jump-n-sample", "2", "--jump-length", "2"], 2),
                     (["--figure", "forward"], None), (["--figure", "reverse", "--n", "2", "--steps", "3"], None),
                     (["--figure", "attention", "--steps", "3"], None), (["--sampler", "dpm++", "--steps", "3"], 2)]:
        out = str(tmp_path / "x.png")
        r = cli(capsys, sample.main, [ldm, *extra, "--out", out] + (["--n", str(n)] if n and "--interpolate" not in extra else []))
        assert r.returncode == 0 and os.path.exists(out), (extra, r.stderr)
        if "attention" in extra:  # the latent's own grid, not the pixel presets' 16x16
            assert "on its 4x4 feature map of the 4x4 latent" in r.stdout, r.stdout
    # inpainting: the known pixels are the image's exactly (the latent grid is filled where any pixel is not)
    out_dir = str(tmp_path / "inp")
    r = cli(capsys, sample.main, [ldm, "--init", face, "--mask", "center", "--steps", "4", "--jump-n-sample", "2", "--jump-length", "2",
                                  "--n", "1", "--out", str(tmp_path / "i.png"), "--out-dir", out_dir])
    img = torchvision.io.read_image(os.path.join(out_dir, "000000.png"))
    init = data.preprocess(face, 16, "auto")
    keep = torch.ones(16, 16, dtype=torch.bool)
    keep[4:12, 4:12] = False
    assert torch.equal(img[:, keep], init[:, keep])


@pytest.mark.parametrize("stage", ["autoencoder", "latent"])
def test_resume_of_each_latent_stage_is_bit_exact(latent_run, faces, tmp_path, stage):
    ae_out, _, cache = latent_run
    flags = ["--autoencoder", *AE_TINY] if stage == "autoencoder" else ["--latents", ae_out, *LDM_TINY, "--posterior", "sample"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--data", faces, "--cache-dir", cache, *flags]
    train.main([*common, "--out", a, "--max-steps", "2"])
    train.main(["--resume", "--out", a, "--max-steps", "5"])
    train.main([*common, "--out", b, "--max-steps", "5"])
    assert_same_training_state(a, b, 5)


def test_latent_diffusion_refusals_are_one_line(latent_run, faces, tmp_path, capsys):
    ae, ldm, cache = latent_run
    out = str(tmp_path / "o")
    base = ["--data", faces, "--cache-dir", cache, "--out", out, *CPU]
    for argv, words in [
        ([*base, "--latents", ldm], "is a diffusion model's checkpoint, not an autoencoder's"),
        ([*base, "--latents", ae, "--size", "30"], "encodes sizes its factor divides; use a multiple of 4"),
        ([*base, "--latents", ae, "--crop", "none"], "was trained with --crop auto"),
        ([*base, "--latents", str(tmp_path / "none.pt")], "not found"),
        ([*base, "--factor", "8"], "--factor is for an autoencoder run (--autoencoder)"),
        ([*base, "--posterior", "sample"], "--posterior is for a latent run"),
        ([*base, "--autoencoder", "--attrs", "Smiling"], "--attrs is for a diffusion run"),
        ([*base, "--autoencoder", "--latents", ae], "--latents is for a diffusion run"),
        ([*base, "--autoencoder", "--factor", "3"], "invalid choice"),
        (["--resume", ldm, "--size", "32", *CPU], "--size 32 contradicts the checkpoint's 16"),
        (["--resume", ldm, "--latents", str(tmp_path / "x.pt"), *CPU], "learns the latents of"),
        (["--resume", ldm, "--autoencoder", *CPU], "--autoencoder contradicts the checkpoint"),
    ]:
        one_line_error(cli(capsys, train.main, argv), words)
    png = ["--out", str(tmp_path / "x.png")]
    for argv, words in [([ldm, "--bpd", "2"], "is a latent model, whose bound would be in bits per latent value"),
                        ([ldm, "--no-clip", *png], "latents are never clipped"),
                        ([ldm, "--data", faces, *png], "--data does not apply to sampling"),
                        ([ae, "--sampler", "ddpm", *png], "does not apply to an autoencoder's reconstructions")]:
        one_line_error(cli(capsys, sample.main, argv), words)


def test_a_latent_checkpoints_metadata_is_checked_before_any_use(latent_run, tmp_path, capsys):
    # every value a latent checkpoint's use depends on is checked: its first stage there, its scale factor a finite
    # positive number, its settings as written (a checksum), its autoencoder's tensors; each damage is one line on
    # sampling and on resuming, and nothing is written
    ae, ldm, cache = latent_run
    good = util.load_checkpoint(ldm)
    args = dict(good["autoencoder_args"])
    cases = {"no_ae": ({k: v for k, v in good.items() if k != "autoencoder"}, "without its autoencoder entry"),
             "none": (dict(good, autoencoder_args=dict(args, scale_factor=None)), "scale factor None"),
             "nan": (dict(good, autoencoder_args=dict(args, scale_factor=float("nan"))), "scale factor nan"),
             "zero": (dict(good, autoencoder_args=dict(args, scale_factor=0.0)), "scale factor 0.0")}
    for name, (ckpt, words) in cases.items():
        util.save_checkpoint(ckpt, str(tmp_path / f"{name}.pt"))
    torch.save(dict(good, autoencoder_args=dict(args, scale_factor=2.0)), str(tmp_path / "edited.pt"))
    cases["edited"] = (None, "its settings, configs or counters fail their checksum")
    raw = bytearray(open(os.path.join(ldm, "ckpt.pt"), "rb").read())
    at = bytes(raw).find(good["autoencoder"]["decoder.conv_out.bias"].numpy().tobytes())
    raw[at + 5] ^= 1
    open(tmp_path / "flipped.pt", "wb").write(raw)
    cases["flipped"] = (None, "its autoencoder tensors fail their checksum")
    for name, (_, words) in cases.items():
        path = str(tmp_path / f"{name}.pt")
        for main, argv in ((sample.main, [path, "--n", "1", "--out", str(tmp_path / "s.png")]),
                           (train.main, ["--resume", path, "--out", str(tmp_path / name), *CPU])):
            r = cli(capsys, main, argv)
            one_line_error(r, words)
            assert "intact" not in r.stdout, (name, r.stdout)
    assert not os.path.exists(tmp_path / "s.png")


# -----------------------------------------------------------------------------
# the docs: what README.md and REPORT.md show is there, and their commands parse


def doc_text():
    return {name: open(os.path.join(HERE, name)).read() for name in ("README.md", "REPORT.md")}


def test_every_figure_the_docs_show_exists():
    import re
    for name, text in doc_text().items():
        shown = set(re.findall(r"\(?(assets/[\w.\-]+\.(?:png|gif))", text))
        assert shown, name
        missing = [p for p in shown if not os.path.isfile(os.path.join(HERE, p))]
        assert not missing, (name, missing)


def test_every_command_in_the_docs_passes_its_checks(tmp_path, monkeypatch):
    # every train.py, sample.py and data.py command in README.md and REPORT.md, as a user would paste it (comments
    # dropped, continued lines joined): it parses, and the checks that need no data accept it (train.py's flag
    # checks and model, of each stage of --latent-diffusion, a latent run's with the default autoencoder;
    # sample.py's mode, flags, files and outputs)
    import re, shlex
    monkeypatch.chdir(tmp_path)  # sample.py's output checks write scratch files where the command says
    parsers = {"train.py": lambda a: settings.make_parser().parse(a), "sample.py": lambda a: sample.make_parser().parse(a),
               "data.py": lambda a: (data.get_args(a), set())}
    for name, text in doc_text().items():
        commands = 0
        for line in text.replace("\\\n", " ").splitlines():
            for m in re.finditer(r"(?:python|(torchrun[^`]*?))\s+(train\.py|sample\.py|data\.py)((?:\s+[^`#&|;]*)?)", line):
                script = m.group(2)
                argv = [a for a in shlex.split(m.group(3)) if a not in ("[CHANGE]", "[SAMPLER", "FLAGS]")]
                argv = [a for a in argv if not (a.startswith("[") or a.endswith("]"))]  # [--eta ETA]: optional parts
                examples = {"S": "1", "N": "100", "N/10": "10", "1-10/N": "0.99", "W": "2", "ETA": "0", "SAMPLER": "ddim",
                            "A=v": "Smiling=1", "K": "5"}  # the docs' placeholders
                argv = [examples.get(a, a) for a in argv]
                try:
                    args, given = parsers[script](argv)
                except SystemExit as e:  # -h exits 0; an unknown flag or a value that does not parse, 2
                    assert e.code == 0, (name, line)
                    continue
                if script == "train.py":
                    world = int(re.search(r"nproc_per_node[= ](\d+)", m.group(1)).group(1)) if m.group(1) else 1
                    env = SimpleNamespace(world=world, say=quiet)
                    try:
                        for stage in settings.stages(args, given):  # --latent-diffusion: each of its two runs
                            stage_args, stage_given = settings.make_parser().parse(stage) if stage else (args, given)
                            train.check_args(stage_args, stage_given, env, None, stage_of(stage_args))
                    except util.UsageError as e:
                        raise AssertionError((name, line, str(e)))
                if script == "sample.py":
                    for flag in ("init", "mask", "hint", "hint_from"):  # the images the command names, as a user would have them
                        path = getattr(args, flag)
                        if path and path not in sample.MASKS and path.endswith("/"):  # a folder of photos
                            os.makedirs(path, exist_ok=True)
                        elif path and path not in sample.MASKS:
                            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                            Image.new("RGB", (64, 64)).save(path)
                    try:
                        sample.check_flags(args, given)
                    except util.UsageError as e:
                        raise AssertionError((name, line, str(e)))
                commands += 1
        assert commands >= 20, (name, commands)


def test_every_table_row_has_its_tables_number_of_cells():
    # a stray | (an unescaped one inside backticks, say) silently breaks a markdown table
    import re
    for name, text in doc_text().items():
        lines = text.splitlines()
        for i in range(len(lines) - 1):
            if lines[i].startswith("|") and re.fullmatch(r"\|( ?-+ ?\|)+", lines[i + 1].strip()):
                cells, j = lines[i].count("|"), i + 2
                while j < len(lines) and lines[j].startswith("|"):
                    assert lines[j].count("|") - lines[j].count("\\|") == cells, (name, j + 1, lines[j])
                    j += 1


# -----------------------------------------------------------------------------
# every promise at every moment: a resume that moves the end, folders in use, signals before and after the loop


def test_a_resume_that_moves_the_end_says_how_it_differs_from_a_run_planned_so(faces, tmp_path, capsys):
    # 12 steps then a resume to 20: the warm-up was a tenth of the 12 planned (1 step), not of 20 (2 steps). The resume
    # says so, and the weights indeed differ; a resume to the end the run planned is bit for bit the uninterrupted run.
    a, b, c = (str(tmp_path / n) for n in "abc")
    train.main(train_args(faces, a, "--max-steps", "12", "--warmup", "5000"))
    capsys.readouterr()
    train.main(["--resume", "--out", a, "--max-steps", "20"])
    said = capsys.readouterr().out
    assert "note: the run now ends at step 20, not 12: its lr warm-up stays 1 step (one of 20 steps would warm up for 2)" in said, said
    train.main(train_args(faces, b, "--max-steps", "20", "--warmup", "5000"))
    with pytest.raises(AssertionError):
        assert_same_training_state(a, b, 20)
    train.main(train_args(faces, c, "--max-steps", "12", "--warmup", "5000", "--ckpt-every", "6"))
    os.remove(os.path.join(c, "log.csv"))
    train.main(["--resume", "--out", c, "--max-steps", "12"])  # the end it planned: nothing to say, nothing differs
    assert "note:" not in capsys.readouterr().out


def test_resume_flags_are_compared_with_what_the_run_is(latent_run, faces, tmp_path, capsys):
    # a latent run's model flags as the preset set them, its autoencoder by another path to the same file, and the
    # flags that a pixel run does not take named as such (not as contradicting a value the run never had)
    ae, ldm, cache = latent_run
    run = str(tmp_path / "ldm")
    shutil.copytree(ldm, run)
    ckpt = util.load_checkpoint(run)
    net = ckpt["model_args"]
    ch_mult = ",".join(map(str, net["ch_mult"]))
    attn = ",".join(map(str, net["attn_res"]))
    link = str(tmp_path / "same_ae.pt")
    os.symlink(os.path.join(ae, "ckpt.pt"), link)
    r = cli(capsys, train.main, ["--resume", "--out", run, "--attn-res", attn, "--ch-mult", ch_mult, "--num-res-blocks",
                                 str(net["num_res_blocks"]), "--latents", link, "--max-steps", str(ckpt["step"] + 1), *CPU])
    assert r.returncode == 0, r.stderr
    pixel = str(tmp_path / "pix")
    train.main(train_args(faces, pixel, "--max-steps", "1"))
    for argv, words in [(["--z-channels", "2"], "--z-channels is for an autoencoder run"),
                        (["--factor", "8"], "--factor is for an autoencoder run"),
                        (["--latents", link], "is a DDPM on pixels, not on an autoencoder's latents")]:
        one_line_error(cli(capsys, train.main, ["--resume", "--out", pixel, *argv]), words)


def test_a_live_run_and_a_run_that_never_saved_are_named_for_what_they_are(faces, tmp_path, capsys):
    out = str(tmp_path / "run")
    p = long_run(faces, out)  # a live run, before its first checkpoint (--ckpt-every 0)
    try:
        for argv in (train_args(faces, out, "--max-steps", "2"), ["--resume", "--out", out],
                     train_args(faces, out, "--max-steps", "2", "--overwrite")):
            one_line_error(cli(capsys, train.main, argv), "is in use by another run (process")
    finally:
        p.kill()
        p.wait()
    assert "ckpt.pt" not in os.listdir(out) and "log.csv" in os.listdir(out)  # killed (-9) before its first checkpoint
    one_line_error(cli(capsys, train.main, train_args(faces, out, "--max-steps", "2")),
                   "it stopped before its first checkpoint: pass --overwrite")
    one_line_error(cli(capsys, train.main, ["--resume", "--out", out]), "holds no checkpoint to resume (log.csv")
    r = cli(capsys, train.main, train_args(faces, out, "--max-steps", "1", "--overwrite"))
    assert r.returncode == 0 and util.load_checkpoint(out)["step"] == 1, r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_before_the_loop_is_one_line_and_leaves_nothing(tmp_path, sig):
    # SIGTERM (Slurm, timeout) and SIGHUP while the images decode: as Ctrl-C, one line, the shell's code, no --out
    big = torch.randint(0, 256, (3, 800, 800), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torchvision.io.write_jpeg(big, str(tmp_path / "000.jpg"), quality=95)
    for i in range(1, 400):  # links: slow images at no cost
        os.link(tmp_path / "000.jpg", tmp_path / f"{i:03d}.jpg")
    out = str(tmp_path / "out")
    p = subprocess.Popen([sys.executable, "-u", "train.py", "--data", str(tmp_path), "--cache-dir", str(tmp_path / "cache"),
                          "--out", out, *TINY[:TINY.index("--seed")]], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if "decoding" in line:
            p.send_signal(sig)
            break
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig and err.count("\n") == 1 and "interrupted before training started" in err, err
    assert not os.path.exists(out)


def test_a_signal_after_the_last_checkpoint_ends_the_run_as_finished(faces, tmp_path, monkeypatch, capsys):
    # the scheduler's SIGTERM arrives while a finished run exits: it ends with code 0 and says why
    real = util.release_folder
    def release(*a):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    monkeypatch.setattr(util, "release_folder", release)
    r = cli(capsys, train.main, train_args(faces, str(tmp_path / "run"), "--max-steps", "2"))
    assert r.returncode == 0 and "SIGTERM: the run is over, its checkpoint written; exiting with code 0" in r.stderr, r


def test_a_periodic_checkpoint_is_not_written_again_when_a_signal_follows_it(faces, tmp_path, monkeypatch, capsys):
    writes = []
    real = util.save_checkpoint
    monkeypatch.setattr(util, "save_checkpoint", lambda ckpt, *a: writes.append(ckpt["step"]) or real(ckpt, *a))
    real_step = train.train_step
    def step(run, *a):
        if run.step == 2:  # right after the checkpoint of step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, *a)
    monkeypatch.setattr(train, "train_step", step)
    code, out, _ = main_error(capsys, train.main, train_args(faces, str(tmp_path / "run"), "--max-steps", "9",
                                                             "--ckpt-every", "2"))
    assert code == 143 and writes == [2] and "checkpoint written" in out, (writes, out)


def test_the_estimate_of_a_cpu_run_counts_a_steps_own_cost_and_the_encoding(monkeypatch, capsys):
    args, given = settings.make_parser().parse(["--size", "16", "--max-steps", "100", "--batch-size", "32"])
    env = SimpleNamespace(device=torch.device("cpu"), world=1, ctx=contextlib.nullcontext(), say=print)
    monkeypatch.setattr(budget, "time_step", lambda build, probe, shape, batch, **k: 0.2 + 0.1 * batch)  # a step's own 0.2 s
    train.estimate_run(args, env, stage_of(args), 10_000)
    line = capsys.readouterr().out
    assert "100 steps of 32 images at ~3.4 s each" in line, line  # 0.2 + 32 x 0.1, not 32 x (0.2 + 0.1)


def test_sampling_counts_and_sizes_are_said_as_they_are(latent_run, tiny_run, tmp_path, capsys):
    ae, ldm, cache = latent_run
    r = cli(capsys, sample.main, [ae, "--n", "20", "--out", str(tmp_path / "r.png"), "--cache-dir", cache])
    valid = len(data.load(util.load_checkpoint(ae)["args"]["data"], 16, "valid", cache_dir=cache, log=quiet)["images"])
    said = f"the validation split holds {util.plural(valid, 'image')}: {util.plural(valid, 'reconstruction')}, not --n 20"
    assert r.returncode == 0 and said in r.stdout, r.stdout
    one_line_error(cli(capsys, sample.main, [ae, "--n", "600", "--out", str(tmp_path / "r.png")]), "first 512 reconstructions")
    one_line_error(cli(capsys, sample.main, [tiny_run, "--n", "2000", "--out", str(tmp_path / "s.png")]),
                   "the grid keeps the first 1,024 images")
    one_line_error(cli(capsys, sample.main, ["--bench", "--size", "5"]), "use a multiple of")
    assert "fewer levels" not in cli(capsys, sample.main, ["--bench", "--size", "5"]).stderr
    assert "1 downsamplings" not in str(unet_error(unet.UNetConfig(image_size=5, ch_mult=(1, 2))))


def unet_error(cfg):
    try:
        unet.check_config(cfg)
    except ValueError as e:
        return e.args[1]


def test_bad_sizes_flags_and_formats_get_the_right_words(faces, tmp_path, capsys):
    # a size far beyond the images is refused before decoding; a huge autoencoder names its own flag; an impossible KL
    # weight is refused; an image of another format than its name says is skipped with words a user can act on
    r = cli(capsys, data.main, ["--data", faces, "--size", "5000", "--cache-dir", str(tmp_path / "c")])
    one_line_error(r, "times the images' crop", "use a size of 80 or less")
    assert not os.path.exists(tmp_path / "c") or not os.listdir(tmp_path / "c")
    one_line_error(cli(capsys, train.main, ["--autoencoder", "--z-channels", "1000000", "--out", str(tmp_path / "o"), *CPU]),
                   "--z-channels")
    one_line_error(cli(capsys, train.main, ["--autoencoder", "--kl-weight", "1e300"]), "--kl-weight", "[0, 1]")
    folder = tmp_path / "odd"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(face(i, 20, 20).permute(1, 2, 0).numpy()).save(str(folder / f"{i}.png"))
    Image.fromarray(face(9, 20, 20).permute(1, 2, 0).numpy()).save(str(folder / "0a.jpg"), format="BMP")  # a training file
    out = cli(capsys, data.main, ["--data", str(folder), "--size", "16", "--cache-dir", str(tmp_path / "c2"), "--preview", ""]).stdout
    assert "0a.jpg: not a JPEG, PNG, WebP or GIF image" in out and "decode_avif" not in out, out


# -----------------------------------------------------------------------------
# latent diffusion at scale: the encoding inside --minutes, one autoencoder at many sizes, replaced caches


def test_a_latent_runs_encoding_takes_its_share_of_the_budget_and_it_trains_on_what_was_encoded(latent_run, faces, tmp_path,
                                                                                               monkeypatch, capsys):
    # a fake clock: each image encoded (both views) costs 2 s, a training step 0.5 s; --minutes 1 gives the
    # encoding a quarter of what is left (15 s): 8 of the 23 images, a random part, on which the run trains
    ae, ldm, cache = latent_run
    now = fake_clock(monkeypatch, lambda step: 0.5)
    real = data.encoded_rows
    def slow(encode, x, *a):
        now[0] += 2.0 * len(x)
        return real(encode, x, *a)
    monkeypatch.setattr(data, "encoded_rows", slow)
    monkeypatch.setattr(data, "time", SimpleNamespace(time=lambda: now[0]))
    out = str(tmp_path / "ldm")
    argv = ["--data", faces, "--cache-dir", str(tmp_path / "cache"), "--out", out, "--latents", ae, *LDM_TINY, "--minutes", "1"]
    r = cli(capsys, train.main, argv)
    ckpt = util.load_checkpoint(out)
    assert r.returncode == 0 and 4 <= ckpt["train_images"] <= 10, (ckpt["train_images"], r.stdout)
    assert f"{ckpt['train_images']} of the 23 images encoded in the" in r.stdout and "a random part" in r.stdout
    assert now[0] <= 60 and ckpt["step"] > 10
    # a resume trains on the same part; a later run with no budget left for encoding costs nothing more
    before = now[0]
    r = cli(capsys, train.main, ["--resume", "--out", out, "--max-steps", str(ckpt["step"] + 2)])
    assert r.returncode == 0 and util.load_checkpoint(out)["train_images"] == ckpt["train_images"]
    assert now[0] - before < 5, r.stdout  # no encoding


def test_one_autoencoder_encodes_every_size_its_factor_divides(latent_run, faces, tmp_path, capsys):
    ae, ldm, cache = latent_run  # trained at 16x16, f = 4
    out = str(tmp_path / "ldm32")
    tiny = list(LDM_TINY)
    tiny[tiny.index("--attn-res") + 1] = "8"  # the latent is 8x8 now
    r = cli(capsys, train.main, ["--data", faces, "--cache-dir", cache, "--out", out, "--latents", ae, "--size", "32",
                                 *tiny, "--max-steps", "2"])
    assert r.returncode == 0, r.stderr
    ckpt = util.load_checkpoint(out)
    assert ckpt["args"]["size"] == 32 and ckpt["model_args"]["image_size"] == 8 and ckpt["model_args"]["in_channels"] == 4
    r = cli(capsys, sample.main, [out, "--n", "2", "--out", str(tmp_path / "s.png"), "--steps", "2"])
    assert r.returncode == 0 and Image.open(tmp_path / "s.png").size[0] >= 2 * 32, r.stderr


def test_a_replaced_autoencoders_latent_cache_is_removed(latent_run, faces, tmp_path, capsys):
    ae, ldm, cache = latent_run
    mine = str(tmp_path / "ae")
    shutil.copytree(ae, mine)
    cache = str(tmp_path / "cache")
    base = ["--data", faces, "--cache-dir", cache, *LDM_TINY, "--max-steps", "1"]
    train.main([*base, "--latents", mine, "--out", str(tmp_path / "a")])
    first = glob_one(cache, "*-latents-*.bin")
    ckpt = util.load_checkpoint(mine)  # retrained in place: other weights at the same path
    ckpt["ema"] = {k: v + 0.01 for k, v in ckpt["ema"].items()}
    util.save_checkpoint(ckpt, os.path.join(mine, "ckpt.pt"))
    r = cli(capsys, train.main, [*base, "--latents", mine, "--out", str(tmp_path / "b")])
    assert r.returncode == 0 and f"removed {first}, the cache of an autoencoder that {mine} no longer holds" in r.stdout
    assert not os.path.exists(first) and len(glob.glob(os.path.join(cache, "*-latents-*.bin"))) == 1


def test_reconstructions_of_a_users_image_and_of_a_latent_models_first_stage(latent_run, faces, tiny_run, tmp_path, capsys):
    ae, ldm, cache = latent_run
    face_png = os.path.join(faces, sorted(os.listdir(faces))[0])
    for ckpt, extra in ((ae, []), (ldm, ["--reconstruct"])):
        out = str(tmp_path / "r.png")
        r = cli(capsys, sample.main, [ckpt, *extra, "--init", face_png, "--out", out])
        assert r.returncode == 0 and f"reconstructions of {face_png}: PSNR" in r.stdout, r
        assert Image.open(out).size == (16 + 4, 2 * 16 + 6)  # the image above its reconstruction
        r = cli(capsys, sample.main, [ckpt, *extra, "--n", "2", "--out", out, "--cache-dir", cache])
        assert r.returncode == 0 and "validation image" in r.stdout and "PSNR" in r.stdout, r
    one_line_error(cli(capsys, sample.main, [tiny_run, "--reconstruct", "--out", str(tmp_path / "x.png")]),
                   "is a pixel model, which has no autoencoder")


def test_latent_inpainting_hides_the_hole_from_the_encoder(latent_run, faces, tmp_path, monkeypatch, capsys):
    # whatever the hidden region holds, the latents that are kept (and so the result) are the same
    ae, ldm, cache = latent_run
    img = face(3, 16, 16)
    a, b = img.clone(), img.clone()
    b[:, 4:12, 4:12] = 255 - b[:, 4:12, 4:12]  # another face in the hole
    outs = []
    for name, im in (("a", a), ("b", b)):
        path = str(tmp_path / f"{name}.png")
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(path)
        out = str(tmp_path / f"{name}_out.png")
        r = cli(capsys, sample.main, [ldm, "--init", path, "--mask", "center", "--n", "1", "--steps", "4", "--crop", "none",
                                      "--out", out, "--out-dir", str(tmp_path / f"{name}_pngs")])
        assert r.returncode == 0, r.stderr
        outs.append(torchvision.io.read_image(str(tmp_path / f"{name}_pngs" / "000000.png")))
    assert torch.equal(outs[0], outs[1])


def test_the_first_stage_works_in_float32_and_the_samplers_clip_only_when_asked(latent_run):
    ae, ldm, cache = latent_run
    first = autoencoder.FirstStage.from_checkpoint(util.load_checkpoint(ldm)).to("cpu")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = first.encode(x)
        y = first.decode(z)
    assert z.dtype == y.dtype == torch.float32
    torch.testing.assert_close(z, first.encode(x))  # what the latents it learned were: float32 encodings
    d = D.GaussianDiffusion(50)
    far = lambda x, t: torch.full_like(x, -3.0)  # an eps model whose x0_hat lies far outside [-1, 1]
    shape = (1, 4, 2, 2)
    free = d.sample(far, shape, "ddim", 3, 0.0, torch.Generator().manual_seed(0))
    clipped = d.sample(far, shape, "ddim", 3, 0.0, torch.Generator().manual_seed(0), clip=True)
    assert free.abs().max() > 1.5 and clipped.abs().max() <= 1.0 + 1e-6

# -----------------------------------------------------------------------------
# text.py: captions, the tokenizer, the text encoder and cross-attention; text runs end to end

CAPTIONS = ["a smiling woman", "a man with glasses", "a young man", "an old woman with a hat"]
TEXT_TINY = ["--text", "--text-dim", "32", "--text-layers", "1"]


def captioned_folder(root, how, n=12):
    """n 20x20 images with captions: a .txt beside each (how='txt') or a metadata.jsonl ('jsonl'). -> root."""
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(face(300 + i, 20, 20).permute(1, 2, 0).numpy()).save(os.path.join(root, f"{i:03d}.png"))
        if how == "txt":
            open(os.path.join(root, f"{i:03d}.txt"), "w").write(CAPTIONS[i % 4])
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": CAPTIONS[i % 4]}) + "\n")
    if how == "jsonl":
        open(os.path.join(root, "metadata.jsonl"), "w").writelines(rows)
    return root


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny text model of 3 steps on a folder of .txt captions. -> (its --out folder, the folder)."""
    root = tmp_path_factory.mktemp("text")
    folder = captioned_folder(str(root / "txt"), "txt")
    out = str(root / "run")
    train.main(["--data", folder, "--cache-dir", str(root / "cache"), "--out", out, *TINY, *TEXT_TINY, "--max-steps", "3",
                "--eval-every", "3"])
    return out, folder


def test_tokenizer_round_trip_unknown_words_and_the_length_limit():
    tok = texts.Tokenizer.build(["A smiling woman, with glasses", "a man"])
    assert tok.vocab[:3] == texts.SPECIAL and len(set(tok.vocab)) == len(tok.vocab) == 3 + 6
    ids, unknown, cut = tok.encode("A man; smiling with ZEBRA glasses")
    assert ids[0] == texts.BOS and ids[-1] == texts.EOS and tok.decode(ids) == "a man smiling with glasses"
    assert unknown == ["zebra"] and not cut
    assert tok.encode(tok.decode(ids))[0] == ids  # the round trip
    ids, _, cut = tok.encode("a man " * 10, max_tokens=6)
    assert cut and len(ids) == 6 and ids[-1] == texts.EOS
    b = tok.batch(["a man", "a smiling woman with glasses", ""])
    assert b.shape == (3, 7) and (b[0, 4:] == texts.PAD).all() and b[2, :3].tolist() == [texts.BOS, texts.EOS, texts.PAD]
    assert tok.decode(b[1].tolist()) == "a smiling woman with glasses"


def test_celeba_captions_are_in_their_vocabulary_and_the_held_out_phrasings_never_in_training():
    tok = texts.celeba_vocab(CELEBA_ATTRS)
    gen = torch.Generator().manual_seed(0)
    made = {False: set(), True: set()}
    for held_out in (False, True):
        for _ in range(400):
            c = texts.caption(torch.randint(2, (40,), generator=gen), CELEBA_ATTRS, gen, held_out)
            assert not tok.encode(c)[1] and not tok.encode(c)[2], c  # every word known, never cut
            made[held_out].add(c)
    assert "" not in made[False] and len(made[False]) > 300  # a new sentence nearly every time, always a subject
    assert all({"man", "woman", "boy", "girl"} & set(c.replace(",", "").split()) for c in made[False])  # sex and age
    assert not made[False] & made[True]  # a held-out sentence is never a training one
    smiling = texts.Captions(tok, ["Smiling"], seed=0)(torch.ones(200, 1, dtype=torch.uint8), step=0)
    said = {tok.decode(row.tolist()) for row in smiling}
    assert any("smil" in s for s in said) and not any("serious" in s or "not smiling" in s for s in said)


def tiny_text_unet():
    return perturbed(unet.UNet(tiny_config(vocab=texts.Tokenizer.build(CAPTIONS).vocab, text_dim=32, text_layers=1))).eval()


def test_padding_changes_nothing_and_the_empty_caption_is_the_unconditional_path():
    m = tiny_text_unet()
    tok = texts.Tokenizer(m.cfg.vocab)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    short = tok.batch(["a smiling woman", "a man with glasses"])  # (2, 6)
    long = torch.nn.functional.pad(short, (0, 9), value=texts.PAD)  # the same captions, 9 more padding tokens
    with torch.no_grad():
        out = m(x, t, text=short)
        torch.testing.assert_close(m(x, t, text=long), out, atol=1e-5, rtol=1e-4)
        assert (out - m(x, t, text=tok.batch(["a man", "a man"]))).abs().max() > 1e-3  # the words matter
        uncond = m(x, t)
        assert torch.equal(uncond, m(x, t, text=texts.empty(2)))
        dropped = texts.drop(long, torch.Generator().manual_seed(0), 2, slice(0, 2), 1.0)  # every caption dropped
        assert (dropped[:, :2] == texts.empty(2)).all() and (dropped[:, 2:] == texts.PAD).all()
        torch.testing.assert_close(m(x, t, text=dropped), uncond, atol=1e-5, rtol=1e-4)
        kept = texts.drop(long, torch.Generator().manual_seed(0), 2, slice(0, 2), 0.0)
        assert torch.equal(kept, long)
        empty = torch.nn.functional.pad(texts.empty(1)[0], (0, short.shape[1] - 2), value=texts.PAD)
        guided = D.guided(m, short, 3.0, empty, "text")(x, t)  # guidance: the same formula as for attributes
        torch.testing.assert_close(guided, uncond + 3 * (out - uncond), atol=1e-5, rtol=1e-4)
    g = torch.Generator().manual_seed(0)
    share = texts.drop(long.repeat(5000, 1), g, 10000, slice(None), 0.1)[:, 2].eq(texts.PAD).double().mean()
    assert abs(share.item() - 0.1) < 0.015  # dropped whole at --p-uncond


def test_a_fresh_text_model_starts_as_the_unconditional_one_and_each_cross_attention_is_over_the_words():
    m = unet.UNet(tiny_config(vocab=texts.Tokenizer.build(CAPTIONS).vocab, text_dim=32, text_layers=1)).eval()
    blocks = m.attention_layers()
    assert blocks and all(isinstance(b, unet.TransformerBlock) for b in blocks)
    x = torch.randn(2, 32, 8, 8)
    context = m.text_encoder(texts.Tokenizer(m.cfg.vocab).batch(["a smiling woman", "a man"]))
    with torch.no_grad():
        assert torch.equal(blocks[0](x, context), x)  # the zero-initialised output: the identity at the start
        w = perturbed(blocks[0]).cross_weights(x, context)  # (B, heads, HW, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
    assert (w[1, ..., 4:] == 0).all() and (w[1, ..., :4] > 0).all()  # padding is never looked at


class TextOracle:
    """conditional_oracle's model, asked by caption: any word -> the conditional data; the empty caption -> the other."""
    def __init__(self, d, calls):
        self.oracle = conditional_oracle(d, calls)

    def __call__(self, x, t, text):
        return self.oracle(x, t, (text != texts.PAD).sum(1).float() - 2)


def test_text_guidance_matches_its_exact_chain(W=3.0):
    d, calls = D.GaussianDiffusion(1000, "linear"), []
    n, steps = 8192, 50
    caption = torch.tensor([texts.BOS, 5, 6, texts.EOS])
    empty = torch.tensor([texts.BOS, texts.EOS, texts.PAD, texts.PAD])
    x = d.sample(D.guided(TextOracle(d, calls), caption, W, empty, "text"), (n, 1, 2, 2), "ddim", steps, 0.0,
                 torch.Generator().manual_seed(0), clip=False).double()
    assert calls == [2 * n] * steps
    m, s = guided_chain(d, steps, 0.0, W)
    n_eff = n / 4
    assert abs(x.mean() - m) < 5 * s / math.sqrt(n_eff) and abs(x.std() - s) < 5 * s / math.sqrt(2 * n_eff), (x.mean(), x.std(), m, s)


def test_a_metadata_jsonl_folder_trains_and_samples_end_to_end(tmp_path, capsys):
    folder = captioned_folder(str(tmp_path / "jsonl"), "jsonl")  # (the .txt layout: text_run)
    rows = open(os.path.join(folder, "metadata.jsonl")).readlines()
    rows[4] = json.dumps({"file_name": "004.png", "text": "a smiling woman " * 30}) + "\n"
    open(os.path.join(folder, "metadata.jsonl"), "w").writelines(rows)
    out = str(tmp_path / "run")
    r = cli(capsys, train.main, ["--data", folder, "--cache-dir", str(tmp_path / "cache"), "--out", out, *TINY, *TEXT_TINY,
                                 "--max-steps", "2", "--eval-every", "2", "--sample-every", "2", "--sample-n", "4",
                                 "--max-tokens", "16"])
    assert r.returncode == 0 and "text: 11 captions of 10 words" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("longer than 16 tokens and were cut (004.png") == 1, r.stdout  # said once
    r = cli(capsys, data.main, ["--data", folder, "--size", "16", "--cache-dir", str(tmp_path / "cache"), "--preview", ""])
    assert "text:    11 captions (metadata.jsonl), e.g. 'a smiling woman'" in r.stdout, r.stdout  # what the run read
    ckpt = util.load_checkpoint(out)
    assert ckpt["model_args"]["vocab"][:3] == list(texts.SPECIAL) and "hat" in ckpt["model_args"]["vocab"]
    assert [row for row in log_rows(out) if row["val_loss"]]  # evaluated on the held-out images' own captions
    r = cli(capsys, sample.main, [out, "--prompt", "a smiling purple woman", "--negative-prompt", "glasses", "--n", "3",
                                  "--steps", "3", "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "g")])
    assert r.returncode == 0 and "does not know 'purple'" in r.stdout and "prompt: 'a smiling woman', away from 'glasses'" in r.stdout
    assert len(os.listdir(tmp_path / "g")) == 3


def test_every_sampling_mode_takes_a_prompt(text_run, tmp_path, capsys):
    out, folder = text_run
    init = os.path.join(folder, "000.png")
    for extra in (["--compare", "with a hat", "--n", "2"], ["--init", init, "--strength", "0.5"],
                  ["--init", init, "--mask", "center", "--jump-n-sample", "1"], ["--interpolate", "3"]):
        r = cli(capsys, sample.main, [out, "--prompt", "a smiling man", *extra, "--steps", "3", "--out", str(tmp_path / "x.png")])
        assert r.returncode == 0 and "text guidance 3" in r.stdout, (extra, r.stdout + r.stderr)
        assert "compared with 'a smiling man with a hat'" in r.stdout or "--compare" not in extra
    opt = sample.check_flags(*sample.make_parser().parse([out, "--prompt", "a smiling woman with a hat", "--steps", "4",
                                                          "--figure", "attention", "--out", str(tmp_path / "a.png")]))
    job = sample.load(opt, set(), torch.device("cpu"), contextlib.nullcontext())
    face, maps = sample.word_maps(job, job.noise(1))
    assert face.shape == (1, 3, 16, 16) and maps.shape == (job.cond.shape[0], 8, 8)
    torch.testing.assert_close(maps.sum(0), torch.ones(8, 8))  # each position's attention is over the caption's tokens
    r = cli(capsys, sample.main, [out, "--prompt", "a smiling woman with a hat", "--figure", "attention", "--steps", "3",
                                  "--out", str(tmp_path / "a.png")])
    assert r.returncode == 0 and Image.open(tmp_path / "a.png").width > 6 * 128  # the face and a map per word


def test_exact_resume_of_a_celeba_text_run(tmp_path):
    make_celeba(str(tmp_path / "c"), "torchvision", n=12, listed_missing=0, corrupt=False)
    args = ["--data", str(tmp_path / "c"), "--cache-dir", str(tmp_path / "cache"), *TINY, *TEXT_TINY]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main([*args, "--out", a, "--max-steps", "3", "--ckpt-every", "2"])
    train.main([*args, "--out", a, "--max-steps", "5", "--resume"])
    train.main([*args, "--out", b, "--max-steps", "5"])
    assert_same_training_state(a, b, 5)
    ckpt = util.load_checkpoint(a)
    assert set(texts.celeba_vocab(ATTRS).vocab) == set(ckpt["model_args"]["vocab"])  # CelebA's words, made from its 3 attributes


def test_text_refusals_are_one_line_and_lose_nothing(text_run, tiny_run, cond_run, faces, tmp_path, capsys):
    out, folder = text_run
    bad = {}
    for name, change in [("missing", lambda d: [os.remove(os.path.join(d, f"00{i}.txt")) for i in (1, 2)]),
                         ("empty", lambda d: open(os.path.join(d, "003.txt"), "w").write("  \n")),
                         ("latin1", lambda d: open(os.path.join(d, "003.txt"), "wb").write("un caf\xe9".encode("latin-1")))]:
        bad[name] = str(tmp_path / name)
        shutil.copytree(folder, bad[name])
        change(bad[name])
    jsonl = captioned_folder(str(tmp_path / "jsonl"), "jsonl")
    open(os.path.join(jsonl, "metadata.jsonl"), "a").write("{not json\n")
    plain = ["--cache-dir", str(tmp_path / "cache"), *TINY, "--out", str(tmp_path / "o")]
    base = [*plain, *TEXT_TINY]
    for where, words in [(faces, "no captions"), (bad["missing"], "2 of the 11 train images have no caption (001.png, 002.png)"),
                         (bad["empty"], "captions are empty (003.png)"), (bad["latin1"], "003.txt: not UTF-8"),
                         (jsonl, "metadata.jsonl line 13: not a JSON object")]:
        r = cli(capsys, train.main, ["--data", where, *base])
        one_line_error(r, words)
        assert "decoding" not in r.stdout and not os.path.exists(tmp_path / "cache")  # refused before any decoding
    for extra, words in [(["--text", "--attrs", "Smiling"], "--text and --attrs"), (["--text-dim", "64"], "add --text"),
                         (["--max-tokens", "8"], "add --text")]:
        one_line_error(cli(capsys, train.main, ["--data", folder, *plain, *extra]), words)
    for ckpt, extra, words in [(tiny_run, ["--prompt", "a smiling man"], "follows no words"),
                               (cond_run[0], ["--negative-prompt", "glasses"], "not a text model"),
                               (out, ["--attrs", "Smiling=1"], "is a text model; ask in words with --prompt"),
                               (out, ["--prompt", "purple dragons"], "knows none of these words"),
                               (out, ["--figure", "attention"], "add --prompt TEXT"),
                               (out, ["--guidance", "2"], "add --prompt TEXT")]:
        r = cli(capsys, sample.main, [ckpt, *extra, "--out", str(tmp_path / "x.png")])
        one_line_error(r, words)
    assert not os.path.exists(tmp_path / "x.png")


def test_a_latent_text_model_trains_and_samples(latent_run, tmp_path, capsys):
    ae = latent_run[0]
    folder = captioned_folder(str(tmp_path / "txt"), "txt")
    out = str(tmp_path / "ldm")
    r = cli(capsys, train.main, ["--data", folder, "--cache-dir", str(tmp_path / "cache"), "--out", out, "--latents", ae,
                                 *LDM_TINY, *TEXT_TINY, "--max-steps", "2"])
    assert r.returncode == 0, r.stderr
    assert util.load_checkpoint(out)["model_args"]["in_channels"] == 4
    r = cli(capsys, sample.main, [out, "--prompt", "a man with a hat", "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert r.returncode == 0 and Image.open(tmp_path / "g.png").size == (2 * 18 + 2, 18 + 2), r.stdout + r.stderr


# -----------------------------------------------------------------------------
# ControlNet: a locked base steered by edge maps


def random_unet(cfg, seed):
    """A U-Net with every weight random (the zero-initialised ones too): a base that is not the identity."""
    torch.manual_seed(seed)
    net = unet.UNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


@pytest.mark.parametrize("in_channels,grid,hint_size,attrs", [(3, 16, 16, ()), (4, 8, 32, ()), (3, 16, 16, ("Smiling", "Male"))])
def test_a_controlnet_starts_as_its_base_bit_for_bit_and_learns_only_its_own_weights(in_channels, grid, hint_size, attrs):
    cfg = unet.preset(grid, ch=16, ch_mult=(1, 2), attn_res=(grid // 2,), num_res_blocks=1, in_channels=in_channels, attrs=attrs)
    base = random_unet(cfg, 0)
    model = control.ControlledUNet(control.ControlConfig(base=unet.config_dict(cfg), hint_size=hint_size))
    model.load_base(base.state_dict())
    model.eval()
    x, t = torch.randn(3, in_channels, grid, grid), torch.tensor([0, 20, 49])
    a = torch.tensor([[1, -1], [0, 1], [-1, 0]]) if attrs else None
    hint = control.edges(torch.rand(3, 3, hint_size, hint_size) * 2 - 1)
    assert hint.shape == (3, 1, hint_size, hint_size) and abs(hint.mean().item() - control.EDGE_SHARE) < 0.02
    with torch.no_grad():
        assert torch.equal(model(x, t, a, hint=hint), base(x, t, a))  # zero convs: exactly the base at step 0
    locked = {k: v.clone() for k, v in model.base.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(x, t, a, hint=hint).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in locked.items())  # the base never moves
    assert not model.base.training and all(p.grad is None for p in model.base.parameters())
    model.eval()
    with torch.no_grad():
        moved = model(x, t, a, hint=hint)
        assert not torch.allclose(moved, base(x, t, a))  # the control now steers
        model.scale = 0.0
        assert torch.equal(model(x, t, a, hint=hint), base(x, t, a))  # scale 0: the base alone
    assert 0.2 < model.trainable_params() / model.num_params() < 0.8  # a copy of the encoder, not the decoder


def test_edges_and_their_dice_mean_what_they_say():
    img = torch.full((1, 3, 32, 32), -1.0)
    img[..., 8:24, 8:24] = 1.0  # a white square on black: its outline is its edges
    e = control.edges(img)
    k = round(control.EDGE_SHARE * 32 * 32)
    assert k <= e.sum() <= 1.1 * k  # the strongest tenth (ties at the threshold kept)
    ys, xs = torch.nonzero(e[0, 0], as_tuple=True)
    assert ys.min() >= 5 and ys.max() <= 26 and xs.min() >= 5 and xs.max() <= 26  # on the outline, not the flat areas
    assert e[0, 0, 16, 16] == 0 and e[0, 0, 1, 1] == 0
    assert control.edge_dice(img, e).item() == 1.0  # an image keeps its own edges
    shifted = torch.roll(img, 8, dims=3)
    assert control.edge_dice(shifted, e).item() < 0.7
    assert control.dice(e, 1 - e).item() == 0.0
    thin = torch.zeros(1, 1, 32, 32)
    thin[0, 0, 16, 4:28] = 0.3  # a faint one-pixel line: binary, and thickened to a tenth's half
    drawn = control.hint_of_drawing(thin)
    assert set(drawn.unique().tolist()) == {0.0, 1.0} and drawn.mean() >= control.EDGE_SHARE / 2 and drawn[0, 0, 16, 16] == 1
    assert drawn[0, 0, 0, 0] == 0 and drawn[0, 0, 16, 0] == 0


@pytest.fixture(scope="module")
def control_run(tiny_run, faces, tmp_path_factory):
    """A ControlNet of 3 steps on tiny_run's base, with a validation loss and a grid. -> its --out folder."""
    out = str(tmp_path_factory.mktemp("control") / "run")
    train.main(["--data", faces, "--cache-dir", os.path.join(os.path.dirname(out), "cache"), "--out", out, "--control", tiny_run,
                "--warmup", "2", "--log-every", "1", "--sample-every", "3", "--sample-n", "2", "--sample-steps", "2", "--eval-every", "3",
                "--ckpt-every", "0", "--max-steps", "3", *CPU, "--seed", "5"])
    return out


def test_a_controlnet_run_keeps_its_base_locked_resumes_exactly_and_samples_from_one_file(control_run, tiny_run, faces, tmp_path, capsys):
    base, ctl = util.load_checkpoint(tiny_run), util.load_checkpoint(control_run)
    assert ctl["args"]["control"] and ctl["args"]["size"] == base["args"]["size"]  # the base's settings
    for part in ("model", "ema"):  # the base's EMA weights, unchanged, in both
        assert all(torch.equal(v, ctl[part]["base." + k]) for k, v in base["ema"].items())
    trained = [k for k in ctl["model"] if k.startswith("control.")]
    assert len(ctl["optimizer"]["state"]) == len(trained)  # only the control is optimised
    assert any(not torch.equal(ctl["model"][k], torch.zeros_like(ctl["model"][k])) for k in trained if "zero_convs" in k)
    assert Image.open(os.path.join(control_run, "samples_0000003.png")).size == (2 * 18 + 2, 18 + 2)  # hint, sample
    # resumed at step 2 it ends where the uninterrupted run ends
    args = ["--data", faces, "--cache-dir", str(tmp_path / "cache"), "--control", tiny_run, "--warmup", "2", "--log-every", "1",
            "--sample-every", "0", "--eval-every", "0", "--ckpt-every", "0", *CPU, "--seed", "5"]
    assert cli(capsys, train.main, [*args, "--out", str(tmp_path / "a"), "--max-steps", "4"]).returncode == 0
    assert cli(capsys, train.main, [*args, "--out", str(tmp_path / "b"), "--max-steps", "2"]).returncode == 0
    r = cli(capsys, train.main, ["--resume", "--out", str(tmp_path / "b"), "--max-steps", "4"])
    assert r.returncode == 0, r.stderr
    assert_same_training_state(str(tmp_path / "a"), str(tmp_path / "b"), 4)
    moved = str(tmp_path / "only.pt")
    shutil.copy(os.path.join(control_run, "ckpt.pt"), moved)  # one file: the base travels inside it
    r = cli(capsys, sample.main, [moved, "--hint-from", faces, "--n", "3", "--steps", "2", "--out", str(tmp_path / "s.png"),
                                  "--out-dir", str(tmp_path / "gen")])
    assert r.returncode == 0 and len(os.listdir(tmp_path / "gen")) == 3 and "edges: Dice" in r.stdout, r.stdout + r.stderr
    dice = float(r.stdout.split("edges: Dice ")[1].split()[0])
    assert 0 <= dice <= 1
    sketch = Image.new("L", (50, 30), 255)  # black lines on white, another size: inverted and resized
    for x in range(10, 40):
        sketch.putpixel((x, 15), 0)
    sketch.save(tmp_path / "sketch.png")
    r = cli(capsys, sample.main, [moved, "--hint", str(tmp_path / "sketch.png"), "--n", "2", "--steps", "2", "--control-scale", "0.5",
                                  "--seed", "1", "--out", str(tmp_path / "k.png")])
    assert r.returncode == 0 and "inverted" in r.stdout and Image.open(tmp_path / "k.png").size == (3 * 18 + 2, 18 + 2), r.stderr


def test_a_controlnet_on_a_latent_base_and_its_refusals(latent_run, control_run, tiny_run, faces, tmp_path, capsys):
    ae, ldm, cache = latent_run
    out = str(tmp_path / "lc")
    r = cli(capsys, train.main, ["--data", faces, "--cache-dir", cache, "--out", out, "--control", ldm, "--warmup", "2",
                                 "--sample-every", "0", "--eval-every", "0", "--max-steps", "2", *CPU, "--seed", "5"])
    assert r.returncode == 0, r.stderr
    ckpt = util.load_checkpoint(out)
    assert "autoencoder" in ckpt and ckpt["model_args"]["hint_size"] == 16  # hints of the 16x16 faces, latents 4x4
    r = cli(capsys, sample.main, [out, "--hint-from", os.path.join(faces, "000.png"), "--n", "2", "--steps", "2",
                                  "--out", str(tmp_path / "l.png")])
    assert r.returncode == 0 and Image.open(tmp_path / "l.png").size == (3 * 18 + 2, 18 + 2), r.stderr
    black = str(tmp_path / "black.png")
    Image.new("L", (16, 16), 0).save(black)
    common = ["--data", faces, "--cache-dir", cache, "--out", str(tmp_path / "x"), *CPU]
    for args, words in [(["--control", ae], "an autoencoder's checkpoint"), (["--control", control_run], "a control run's"),
                        (["--control", tiny_run, "--ch", "8"], "--ch: a control run takes its base's network"),
                        (["--control", tiny_run, "--latents", ae], "--latents: a control run takes its base's"),
                        (["--control", tiny_run, "--hint-concat"], "use one of them")]:
        one_line_error(cli(capsys, train.main, [*common, *args]), words)
    assert not os.path.exists(tmp_path / "x")
    png = ["--n", "1", "--steps", "2", "--out", str(tmp_path / "y.png")]
    os.makedirs(tmp_path / "empty")
    for ckpt, args, words in [(tiny_run, ["--hint", black], "not a ControlNet"), (control_run, [], "give it the edges to follow"),
                              (control_run, ["--hint", black], "has no lines"),
                              (control_run, ["--hint", black, "--hint-from", faces], "use one of them"),
                              (control_run, ["--hint-from", str(tmp_path / "none")], "no such file or folder"),
                              (control_run, ["--hint-from", str(tmp_path / "empty")], "no .jpg or .png"),
                              (control_run, ["--bpd", "2"], "depends on its hint")]:
        one_line_error(cli(capsys, sample.main, [ckpt, *args, *(png if "--bpd" not in args else [])]), words)
    assert not os.path.exists(tmp_path / "y.png")


def test_a_controlnet_on_a_text_base_follows_prompt_and_hint_under_guidance(text_run, tmp_path, capsys):
    base, folder = text_run
    out = str(tmp_path / "tc")
    r = cli(capsys, train.main, ["--data", folder, "--cache-dir", str(tmp_path / "cache"), "--out", out, "--control", base,
                                 "--warmup", "2", "--sample-every", "0", "--eval-every", "0", "--max-steps", "2", *CPU, "--seed", "5"])
    assert r.returncode == 0, r.stderr
    ckpt = util.load_checkpoint(out)
    assert ckpt["args"]["text"] and ckpt["model_args"]["base"]["vocab"] == util.load_checkpoint(base)["model_args"]["vocab"]
    model = control.from_checkpoint(ckpt).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    hint = control.edges(torch.rand(2, 3, 16, 16) * 2 - 1)
    tokens = texts.Tokenizer(model.cfg.vocab).batch(["a man", ""], model.cfg.max_tokens)
    with torch.no_grad():  # guidance puts the hint in both branches: its doubled batch equals two calls
        both = D.guided(functools.partial(model, hint=hint), tokens[0], 3.0, tokens[1], "text")(x, t)
        cond = model(x, t, text=tokens[:1].expand(2, -1), hint=hint)
        uncond = model(x, t, text=tokens[1:].expand(2, -1), hint=hint)
    assert torch.allclose(both, uncond + 3.0 * (cond - uncond), atol=1e-5)
    r = cli(capsys, sample.main, [out, "--prompt", "a man", "--hint-from", os.path.join(folder, "000.png"), "--n", "2", "--steps", "2",
                                  "--out", str(tmp_path / "g.png")])
    assert r.returncode == 0 and "prompt: 'a man'" in r.stdout, r.stdout + r.stderr


def test_the_controlnets_baseline_reads_the_hint_as_input_channels(latent_run, faces, tmp_path, capsys):
    ae = latent_run[0]
    for name, extra in [("pixels", TINY), ("latents", ["--latents", ae, *LDM_TINY])]:
        out = str(tmp_path / name)
        r = cli(capsys, train.main, ["--data", faces, "--cache-dir", str(tmp_path / "cache"), "--out", out, *extra, "--hint-concat",
                                     "--max-steps", "2", "--sample-every", "2", "--sample-n", "2", "--sample-steps", "2"])
        assert r.returncode == 0, r.stderr
        ckpt = util.load_checkpoint(out)
        f = 4 if name == "latents" else 1
        assert ckpt["model_args"]["hint_channels"] == f * f and ckpt["model"]["conv_in.weight"].shape[1] == ckpt["model_args"]["in_channels"] + f * f
        net = unet.from_checkpoint(ckpt, "model").eval()
        c, g = ckpt["model_args"]["in_channels"], ckpt["model_args"]["image_size"]
        x, t = torch.randn(2, c, g, g), torch.tensor([5, 30])
        hints = control.edges(torch.rand(2, 3, 16, 16) * 2 - 1)
        with torch.no_grad():  # the hint is an input: another hint, another output; the output has the image's channels
            a, b = net(x, t, hint=hints), net(x, t, hint=hints.flip(0))
        assert a.shape == x.shape and not torch.allclose(a, b)
        r = cli(capsys, sample.main, [out, "--hint-from", faces, "--n", "2", "--steps", "2", "--out", str(tmp_path / f"{name}.png")])
        assert r.returncode == 0 and "edges: Dice" in r.stdout, r.stdout + r.stderr
        one_line_error(cli(capsys, sample.main, [out, "--hint-from", faces, "--control-scale", "2", "--out", str(tmp_path / "x.png")]),
                       "drop --control-scale")
    assert "hint_channels" not in repr(unet.preset(16))  # other models' configs read as before


# -----------------------------------------------------------------------------
# DreamBooth: a text model fine-tuned on photos of one person, with prior preservation


def test_grow_vocab_adds_the_new_words_and_keeps_the_known_ones():
    vocab = (*texts.SPECIAL, "a", "person", "photo", "of")
    weights = {texts.EMBEDDING: torch.randn(len(vocab), 8), "other": torch.ones(2)}
    grown, new_vocab, new = texts.grow_vocab(weights, vocab, "a photo of sks person, sks")
    assert new == ["sks"] and new_vocab == vocab + ("sks",) and grown["other"] is weights["other"]
    table = grown[texts.EMBEDDING]
    assert table.shape == (len(vocab) + 1, 8) and torch.equal(table[:len(vocab)], weights[texts.EMBEDDING])
    assert torch.allclose(table[-1], weights[texts.EMBEDDING][3:].mean(0))  # the mean of the words' rows
    same, same_vocab, none = texts.grow_vocab(weights, vocab, "a photo of a person")
    assert none == [] and same_vocab == vocab and torch.equal(same[texts.EMBEDDING], weights[texts.EMBEDDING])


def person_folder(root, n=3):
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        Image.fromarray(face(500 + i, 20, 20).permute(1, 2, 0).numpy()).save(os.path.join(root, f"{i}.png"))
    return root


def test_dreambooth_fine_tunes_a_text_model_on_every_photo_and_resumes_exactly(text_run, tiny_run, tmp_path, capsys):
    base, _ = text_run
    photos = person_folder(str(tmp_path / "person"))
    args = ["--data", photos, "--cache-dir", str(tmp_path / "cache"), "--finetune", base, "--instance-prompt", "a sks man",
            "--class-prompt", "a man", "--class-images", "4", "--warmup", "1",
            "--log-every", "1", "--sample-every", "0", "--ckpt-every", "0", *CPU, "--seed", "5"]
    r = cli(capsys, train.main, [*args, "--out", str(tmp_path / "a"), "--max-steps", "4", "--sample-every", "4", "--sample-n", "2",
                                 "--sample-steps", "2"])
    assert r.returncode == 0, r.stderr
    assert "3 photos" in r.stdout and "new words 'sks'" in r.stdout and "4 class images" in r.stdout, r.stdout
    b0, a = util.load_checkpoint(base), util.load_checkpoint(str(tmp_path / "a"))
    assert a["model_args"]["vocab"] == [*b0["model_args"]["vocab"], "sks"] and a["train_images"] == 3  # every photo trains
    assert a["args"]["batch_size"] == 3 and a["args"]["lr"] == pytest.approx(b0["args"]["lr"] / 10)
    kept = torch.load(tmp_path / "a" / "class_images.pt", weights_only=True)
    assert kept["x0"].shape == (4, 3, 16, 16) and kept["prompt"] == "a man"
    assert os.path.exists(tmp_path / "a" / "samples_0000004.png")
    # stopped at 2 and resumed, it ends where the uninterrupted run ends, with the class images it drew
    assert cli(capsys, train.main, [*args, "--out", str(tmp_path / "b"), "--max-steps", "2"]).returncode == 0
    drawn = os.path.getmtime(tmp_path / "b" / "class_images.pt")
    r = cli(capsys, train.main, ["--resume", "--out", str(tmp_path / "b"), "--max-steps", "4"])
    assert r.returncode == 0 and "class images" not in r.stdout, r.stdout + r.stderr
    assert os.path.getmtime(tmp_path / "b" / "class_images.pt") == drawn
    assert_same_training_state(str(tmp_path / "a"), str(tmp_path / "b"), 4)
    r = cli(capsys, sample.main, [str(tmp_path / "a"), "--prompt", "a sks man", "--n", "2", "--steps", "2",
                                  "--out", str(tmp_path / "s.png")])
    assert r.returncode == 0 and "does not know" not in r.stdout, r.stdout + r.stderr
    os.remove(tmp_path / "b" / "class_images.pt")
    one_line_error(cli(capsys, train.main, ["--resume", "--out", str(tmp_path / "b"), "--max-steps", "5"]), "class_images.pt is missing")
    common = ["--data", photos, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "x"), *CPU]
    for extra, words in [(["--finetune", tiny_run], "not a text model"), (["--instance-prompt", "a photo of zq man"], "add --finetune"),
                         (["--finetune", base, "--ch", "8"], "--ch: a fine-tuning run takes its base's"),
                         (["--finetune", base, "--eval-every", "2"], "no validation images"),
                         (["--finetune", base, "--control", tiny_run], "use one of them")]:
        one_line_error(cli(capsys, train.main, [*common, *extra]), words)
    assert not os.path.exists(tmp_path / "x")


def test_dreambooth_never_drops_a_caption():
    # A base's condition dropout on the photos taught the unconditional branch the person, and guidance
    # then pushed the class prompt's samples off faces (REPORT 3.14): fine-tuning keeps every caption.
    seen = []
    model = lambda x, t, text=None: seen.append(text) or x * 0
    tokens = torch.tensor([[1, 5, 2], [1, 6, 2]])
    common = dict(batch_size=4, shard=slice(0, 4), p_uncond=1.0, cond_name="text",
                  drop=functools.partial(texts.drop, batch_size=4, shard=slice(0, 4), p_uncond=1.0))
    x0 = torch.randn(4, 3, 8, 8)
    plain = D.Denoising(D.GaussianDiffusion(50), autoencoder.Pixels(), (3, 8, 8), **common)
    plain.losses(x0, tokens[0].expand(4, -1), torch.Generator().manual_seed(0))(model)
    assert not torch.equal(seen.pop(), tokens[0].expand(4, -1))  # a DDPM's loss drops them (here all)
    dreambooth = texts.PriorPreservation(D.GaussianDiffusion(50), autoencoder.Pixels(), (3, 8, 8), class_x0=torch.randn(6, 3, 8, 8),
                                         class_tokens=tokens[1], instance_tokens=tokens[0], prior_weight=1.0, **common)
    dreambooth.losses(x0, tokens[0].expand(4, -1), torch.Generator().manual_seed(0))(model)
    assert torch.equal(seen[0], tokens[0].expand(4, -1)) and torch.equal(seen[1], tokens[1].expand(4, -1))


def test_prior_preservation_adds_the_class_images_loss_at_its_weight():
    diffusion = D.GaussianDiffusion(50)
    model = lambda x, t, text=None: x * 0.5 + text.float().mean(1)[:, None, None, None] * 0.01  # any function of both
    x0 = torch.randn(4, 3, 8, 8)
    common = dict(batch_size=4, shard=slice(0, 4), p_uncond=0.0, drop=lambda c, g: c, cond_name="text")
    tokens = torch.tensor([[1, 5, 2], [1, 6, 2]])
    objective = {w: texts.PriorPreservation(diffusion, autoencoder.Pixels(), (3, 8, 8), class_x0=torch.randn(6, 3, 8, 8),
                                                 class_tokens=tokens[1], instance_tokens=tokens[0], prior_weight=w, **common)
                 for w in (0.0, 1.0, 2.0)}
    objective[1.0].class_x0 = objective[2.0].class_x0 = objective[0.0].class_x0
    loss = {w: o.losses(x0, tokens[0].expand(4, -1), torch.Generator().manual_seed(3))(model) for w, o in objective.items()}
    prior = loss[1.0] - loss[0.0]
    assert (prior > 0).all() and torch.allclose(loss[2.0], loss[0.0] + 2 * prior, atol=1e-5)
    plain = D.Denoising(diffusion, autoencoder.Pixels(), (3, 8, 8), **common).losses(x0, tokens[0].expand(4, -1), torch.Generator().manual_seed(3))
    assert torch.equal(plain(model), loss[0.0])  # weight 0: a DDPM's loss on the photos alone
