"""
Gaussian diffusion: beta schedules, the forward process, the training loss and the samplers; last, the
training objective a DDPM run optimises step by step (`Denoising`: [DDPM] Algorithm 1's t and noise).

Pure math. No optimizer, no data: the model is passed in as `model(x_t, t) -> output`, where t is a
LongTensor of timestep indices in 0..T-1 and the output is the prediction for `objective`.

References (equation numbers refer to these papers):
  [DDPM]  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", arXiv:2006.11239
  [IDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672
  [DDIM]  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502
  [PD]    Salimans, Ho 2022, "Progressive Distillation for Fast Sampling", arXiv:2202.00512 (v target)
  [SNR]   Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", arXiv:2303.09556
  [NS]    Chen 2023, "On the Importance of Noise Scheduling for Diffusion Models", arXiv:2301.10972
  [DPM]   Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling",
          arXiv:2206.00927
  [DPM++] Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
          arXiv:2211.01095
  [SDEdit] Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic Differential
          Equations", arXiv:2108.01073
  [CFG]   Ho, Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598
  [RePaint] Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic Models",
          arXiv:2201.09865

Indexing: the paper's t = 1..T is index t = 0..T-1 here. alphas_cumprod[t] is the paper's
alpha_bar_{t+1}; index 0 is the least noisy step and "t-1" of index 0 is the clean image x_0.
"""
import functools
import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# beta schedules (float64)


def linear_beta_schedule(T):
    # [DDPM] sec. 4: betas from 1e-4 to 0.02 at T=1000; scaled by 1000/T so other T keep the same
    # end point alpha_bar_T ~ 4e-5 ([IDDPM] appendix / improved-diffusion).
    # For small T (< 50) the scaled betas would pass 1; they are capped at 0.999 like the cosine schedule.
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)


def betas_from_alphas_cumprod(alpha_bar_fn, T, max_beta=0.999):
    # beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), capped to avoid a singularity at t=T [IDDPM] eq. 17
    s = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,) times in [0, 1]
    a = alpha_bar_fn(s)
    return (1 - a[1:] / a[:-1]).clamp(max=max_beta)


def cosine_alpha_bar(s, offset=0.008):
    # [IDDPM] eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)
    f = torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2
    return f / math.cos(offset / (1 + offset) * math.pi / 2) ** 2


def sigmoid_alpha_bar(s, start=-3.0, end=3.0, tau=1.0):
    # [NS] Algorithm 1 (sigmoid_schedule): alpha_bar interpolates a sigmoid between start and end
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((s * (end - start) + start) / tau)) / (v_end - v_start)


def make_beta_schedule(name, T):
    if name == "linear":
        return linear_beta_schedule(T)
    if name == "cosine":
        return betas_from_alphas_cumprod(cosine_alpha_bar, T)
    if name == "sigmoid":
        return betas_from_alphas_cumprod(sigmoid_alpha_bar, T)
    raise ValueError(f"unknown beta schedule {name!r}; choose linear, cosine or sigmoid")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_std):
    """log p(x) of [DDPM] sec. 3.3, eq. 13: x on the 256-level grid of [-1, 1] takes the mass of
    N(mean, std^2) over its bin [x - 1/255, x + 1/255]; the outermost bins reach to -inf and +inf.
    Elementwise, in nats."""
    upper = (x - mean + 1 / 255) * torch.exp(-log_std)
    lower = (x - mean - 1 / 255) * torch.exp(-log_std)
    mid = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    edges = torch.where(x > 0.999, torch.special.log_ndtr(-lower), mid)
    return torch.where(x < -0.999, torch.special.log_ndtr(upper), edges)


SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("eps", "x0", "v")
SAMPLERS = ("ddim", "dpm++", "dpm++sde", "ddpm")
# the default sampler, here and in both scripts: the best face quality per model evaluation measured (REPORT
# sec. 3)
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_ETA = "ddim", 20, 1.0

def slerp(z0, z1, weights):
    """Spherical interpolation between two noise tensors (1, ...) at each weight in [0, 1]
    -> (len(weights), ...). Gaussian noise in many dimensions lies near a sphere; a straight line between two
    draws would pass through noise of too small a norm, which the model has never seen."""
    a, b = z0.flatten().double(), z1.flatten().double()
    theta = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))  # the angle between them
    w = weights.to(a)[:, None]
    z = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return z.to(z0.dtype).view(len(weights), *z0.shape[1:])



def guided(model, attrs, guidance=1.0, uncond=None, name="attrs"):
    """A conditional model(x_t, t, attrs) under classifier-free guidance [CFG] eq. 6, as a model(x_t, t):
        out = out(x_t, t, unspecified) + W (out(x_t, t, attrs) - out(x_t, t, unspecified))
    with W = 1 + w of [CFG]. attrs (K,) or (B, K): +1 present, -1 absent, 0 unspecified. W = 1 is the
    conditional model alone, W = 0 the unconditional one. Both halves go through the network as one batch.
    Guiding the raw output is the same for every objective: eps, x0 and v are affine in each other at a given
    x_t, and the weights (W, 1 - W) sum to 1. A text model's condition is a caption's tokens (L,) or (B, L),
    passed as its keyword `name` ("text"); its unspecified state `uncond` is the empty caption, or a negative
    prompt, which the guidance then pushes away from (of the same length: pad both alike)."""
    def model_fn(x, t):
        a = attrs.expand(x.shape[0], -1) if attrs.dim() == 1 else attrs  # (B, K) or (B, L)
        u = torch.zeros_like(a) if uncond is None else uncond.expand_as(a)
        if guidance == 1:
            return model(x, t, **{name: a})
        both = model(torch.cat([x, x]), torch.cat([t, t]), **{name: torch.cat([a, u])})
        cond, unconditional = both.chunk(2)
        return unconditional + guidance * (cond - unconditional)
    return model_fn

# -----------------------------------------------------------------------------


class GaussianDiffusion:
    def __init__(self, timesteps=1000, schedule="linear", objective="eps", min_snr_gamma=None):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose eps, x0 or v")
        if timesteps < 2:  # T = 1 has no reverse step to learn: x_0 would come from pure noise in one jump
            raise ValueError(f"T must be at least 2, got {timesteps}")
        self.T, self.schedule, self.objective = timesteps, schedule, objective
        self.min_snr_gamma = min_snr_gamma
        # Everything below is float64 (T,); `_at` casts to the sample's dtype at use.
        betas = make_beta_schedule(schedule, timesteps)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)  # alpha_bar_t
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas, self.alphas, self.alphas_cumprod = betas, alphas, alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        # q(x_t | x_0), [DDPM] eq. 4
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        # x_0 = x_t / sqrt(alpha_bar) - sqrt(1/alpha_bar - 1) * eps, eq. 4 solved for x_0 ([DDPM] eq. 15)
        self.sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde), [DDPM] eqs. 6-7
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde at index 0 is 0; clip its log to the next value (as the reference code does)
        var = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([var[1:2], var[1:]]))
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)
        # signal-to-noise ratio alpha_bar / (1 - alpha_bar), for min-SNR weighting [SNR]
        self.snr = alphas_cumprod / (1.0 - alphas_cumprod)
        # lambda_t = log(alpha_t / sigma_t), half the log-SNR: the time variable of DPM-Solver [DPM] sec. 3.1
        self.lambdas = 0.5 * torch.log(self.snr)

    def to(self, device):
        """Move the (float64) schedule tensors to `device`, so indexing them never syncs."""
        for k, v in vars(self).items():
            if torch.is_tensor(v):
                setattr(self, k, v.to(device))
        return self

    @staticmethod
    def _at(a, t, x):
        """a[t] for a batch of indices t (B,), cast to x's dtype and shaped (B, 1, 1, 1) to broadcast."""
        return a.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    # -------------------------------------------------------------------------
    # forward process

    def q_sample(self, x0, t, noise):
        # [DDPM] eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
        a, s = self._at(self.sqrt_alphas_cumprod, t, x0), self._at(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * x0 + s * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        # [DDPM] eq. 7: mu_tilde = coef1 x_0 + coef2 x_t, beta_tilde = posterior_variance
        coef1, coef2 = self._at(self.posterior_mean_coef1, t, xt), self._at(self.posterior_mean_coef2, t, xt)
        mean = coef1 * x0 + coef2 * xt
        var = self._at(self.posterior_variance, t, xt)
        return mean, var, self._at(self.posterior_log_variance_clipped, t, xt)

    # -------------------------------------------------------------------------
    # one place that turns any model output into (x0, eps)

    def predict_x0_eps(self, out, xt, t, clip=False):
        """Model output for self.objective -> (x0_hat, eps_hat), consistent with each other unless clip is
        set."""
        recip = self._at(self.sqrt_recip_alphas_cumprod, t, xt)  # 1 / sqrt(alpha_bar)
        recipm1 = self._at(self.sqrt_recipm1_alphas_cumprod, t, xt)  # sqrt(1 / alpha_bar - 1)
        if self.objective == "eps":
            eps = out
            x0 = recip * xt - recipm1 * eps
        elif self.objective == "x0":
            x0 = out
            eps = None
        else:  # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 [PD] sec. 4, so
            a = self._at(self.sqrt_alphas_cumprod, t, xt)
            s = self._at(self.sqrt_one_minus_alphas_cumprod, t, xt)
            x0 = a * xt - s * out  # x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
            eps = s * xt + a * out  # eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v
        if eps is None:  # eq. 4 solved for eps
            eps = (recip * xt - x0) / recipm1
        if clip:
            # Only x0_hat is clipped; eps_hat stays the model's own. Recomputing eps from the clipped x0 (as
            # improved-diffusion does) feeds the clipped, saturated x0 of the noisiest steps back into x_t,
            # and a deterministic sampler then keeps it to the end: colour speckle (REPORT sec. 3.3).
            x0 = x0.clamp(-1, 1)
        return x0, eps

    # -------------------------------------------------------------------------
    # training

    def training_losses(self, model, x0, t, noise, model_kwargs=None):
        """Per-sample loss (B,). t: (B,) indices in 0..T-1, noise: like x0; model_kwargs: the model's other
        inputs (a condition), as improved-diffusion passes them."""
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, **(model_kwargs or {})).float()
        if self.objective == "eps":  # [DDPM] Algorithm 1 line 5, L_simple (eq. 14)
            target = noise
        elif self.objective == "x0":
            target = x0
        else:  # [PD] eq. in sec. 4: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0
            a = self._at(self.sqrt_alphas_cumprod, t, x0)
            target = a * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        loss = F.mse_loss(out, target.float(), reduction="none").mean(dim=list(range(1, x0.dim())))
        if self.min_snr_gamma:
            # [SNR] eq. 9: weight the x0-space loss by min(SNR, gamma); expressed for each target:
            # eps-loss = SNR * x0-loss, v-loss = (SNR + 1) * x0-loss.
            snr = self.snr.to(x0.device)[t]
            w = snr.clamp(max=self.min_snr_gamma)
            w = {"eps": w / snr, "x0": w, "v": w / (snr + 1)}[self.objective]
            loss = loss * w.float()
        return loss

    # -------------------------------------------------------------------------
    # samplers

    def p_mean_variance(self, model, xt, t, clip=False, var_type="beta"):
        """p(x_{t-1} | x_t): mean, variance sigma_t^2 and the predicted x0."""
        x0, _ = self.predict_x0_eps(model(xt, t).float(), xt, t, clip)
        mean, posterior_var, _ = self.q_posterior_mean_variance(x0, xt, t)  # [DDPM] eq. 7 with x0_hat
        # [DDPM] sec. 3.2: sigma_t^2 = beta_t ("fixedlarge") or beta_tilde_t ("fixedsmall")
        var = self._at(self.betas, t, xt) if var_type == "beta" else posterior_var
        return mean, var, x0

    # Every sampler has one signature: sampler(model, x, timesteps, generator, callback, ...) -> x_0. It runs
    # the reverse process from x, the chain's state at timesteps[0], down the decreasing timesteps to the
    # clean image, and calls callback(t, x, x0_hat) after the step from t. `sample` below draws x_T and picks
    # the timesteps.

    @torch.no_grad()
    def ddpm_sample(self, model, x, timesteps, generator=None, callback=None, clip=False, var_type="beta"):
        """[DDPM] Algorithm 2 over consecutive timesteps (t, t-1, ..., 0)."""
        for i in timesteps:  # line 2
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            mean, var, x0 = self.p_mean_variance(model, x, t, clip, var_type)
            z = torch.randn(x.shape, generator=generator, device=x.device) if i > 0 else 0  # line 3
            x = mean + var.sqrt() * z  # line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z
            if callback:
                callback(i, x, x0)
        return x

    def ddim_timesteps(self, steps, t_max=None):
        """The sub-sequence tau of [DDIM] sec. 4.2: `steps` indices spread evenly over 0..T-1 (or 0..t_max),
        increasing."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be in 1..{self.T}, got {steps}")
        t_max = self.T - 1 if t_max is None else t_max
        return torch.linspace(0, t_max, min(steps, t_max + 1), dtype=torch.float64).round().long().unique()

    def ddim_step(self, model, x, t_now, t_prev, eta, generator=None, clip=False):
        """[DDIM] eq. 12 from index t_now to index t_prev (-1: to the clean image) -> (x_prev, x0_hat)."""
        t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
        x0, eps = self.predict_x0_eps(model(x, t).float(), x, t, clip)
        a = self._at(self.alphas_cumprod, t, x)  # alpha_t in [DDIM] notation (= our alpha_bar)
        t_p = torch.full_like(t, max(t_prev, 0))
        a_prev = self._at(self.alphas_cumprod, t_p, x) if t_prev >= 0 else torch.ones_like(a)
        # [DDIM] eq. 16: sigma = eta sqrt((1 - a_prev)/(1 - a)) sqrt(1 - a/a_prev); eta = 1 is DDPM's
        # beta_tilde on tau
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        # [DDIM] eq. 12: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev, x0

    @torch.no_grad()
    def ddim_sample(self, model, x, timesteps, generator=None, callback=None, clip=False, eta=DEFAULT_ETA):
        """[DDIM] eq. 12 down the sub-sequence: eta 0 is deterministic, eta 1 stochastic like DDPM."""
        for i, t_now in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            x, x0 = self.ddim_step(model, x, t_now, t_prev, eta, generator, clip)
            if callback:
                callback(t_now, x, x0)
        return x

    def dpm_timesteps(self, steps, spacing="logsnr", t_max=None):
        """`steps` indices from T-1 (or t_max) down to 0, uniform in lambda ([DPM] sec. 3.4, the default) or
        in t. Indices are rounded to the nearest integer timestep, so the model is only ever asked about the
        timesteps it was trained on; where two rounded points meet (hundreds of steps), one is kept."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DPM-Solver++ steps must be in 1..{self.T}, got {steps}")
        if spacing == "time":
            return self.ddim_timesteps(steps, t_max).flip(0)
        lam = self.lambdas.cpu()[: (self.T if t_max is None else t_max + 1)]
        # (steps,) increasing
        targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
        # (<= steps,) decreasing t
        return (lam[None, :] - targets[:, None]).abs().argmin(1).unique_consecutive()

    @torch.no_grad()
    def dpm_solver_sample(self, model, x, timesteps, generator=None, callback=None, clip=False, sde=False):
        """DPM-Solver++(2M) [DPM++] Algorithm 2: a second-order multistep solver of the probability-flow ODE,
        in data prediction (x0_hat, from any objective). One model evaluation per step; the first step is
        first order. The final jump from the last timestep to the clean image is x_0 = x0_hat.
        sde=True: SDE-DPM-Solver++(2M) [DPM++] sec. 5 / appendix, the same second-order data term for the
        reverse SDE, which adds fresh noise every step; its first-order step is DDIM with eta = 1."""
        alpha, sigma = self.sqrt_alphas_cumprod.tolist(), self.sqrt_one_minus_alphas_cumprod.tolist()
        lam = self.lambdas.tolist()  # on the host: no GPU sync per step
        x0_prev = h_prev = None
        for i, s in enumerate(timesteps):
            t_s = torch.full((x.shape[0],), s, device=x.device, dtype=torch.long)
            x0, eps = self.predict_x0_eps(model(x, t_s).float(), x, t_s, clip)
            # lambda -> inf: x_0 = alpha_0 x0_hat with alpha_0 = 1, [DPM++] eq. 9 with h = inf
            if i == len(timesteps) - 1:
                x = x0
            else:
                t = timesteps[i + 1]
                h = lam[t] - lam[s]  # [DPM++] Algorithm 2: h_i = lambda_{t_i} - lambda_{t_{i-1}}
                if x0_prev is None:
                    D = x0  # first order: DPM-Solver++(1), which is DDIM with eta = 0
                else:
                    r = h_prev / h  # r_i = h_{i-1} / h_i
                    D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev  # D_i, the second-order correction
                # [DPM++] Algorithm 2: x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i}
                # (e^{-h_i} - 1) D_i. With x_s = alpha_s x0_hat + sigma_s eps_hat, the first term is alpha_t
                # e^{-h} x0_hat + sigma_t eps_hat; written that way, a clipped x0_hat enters both x0 terms
                # while eps_hat stays the model's, as in DDIM (the same update exactly when nothing is
                # clipped; its first-order step is DDIM's).
                # the SDE solver decays the x0_hat term by e^{-2h}
                e = math.exp(-h) if not sde else math.exp(-2 * h)
                x = (alpha[t] * e) * x0 + (alpha[t] * (1 - e)) * D
                x = x + (sigma[t] * (math.exp(-h) if sde else 1)) * eps
                # x_t = sigma_t e^{-h} eps_hat + alpha_t (e^{-2h} x0_hat + (1 - e^{-2h}) D) + sigma_t sqrt(1 -
                # e^{-2h}) z
                if sde:
                    z = torch.randn(x.shape, generator=generator, device=x.device)
                    x = x + sigma[t] * math.sqrt(-math.expm1(-2 * h)) * z
                x0_prev, h_prev = x0, h
            if callback:
                callback(s, x, x0)
        return x

    def timesteps(self, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, spacing="logsnr", t_max=None):
        """The decreasing timesteps `sampler` evaluates the model at: all of them from t_max (default T-1) for
        ddpm, DDIM's sub-sequence, or the DPM-Solvers' spacing."""
        if sampler == "ddpm":
            return list(range(self.T - 1 if t_max is None else t_max, -1, -1))
        if sampler == "ddim":
            return self.ddim_timesteps(steps, t_max).flip(0).tolist()
        if sampler in ("dpm++", "dpm++sde"):
            return self.dpm_timesteps(steps, spacing, t_max).tolist()
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")

    def sample(self, model, shape, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, eta=DEFAULT_ETA,
               generator=None, x_T=None, clip=False, var_type="beta", device=None, callback=None,
               spacing="logsnr", t_max=None):
        """Draw samples (B, C, H, W) with `sampler` from x_T, or from fresh noise of `shape` (drawn here, with
        `generator`, and nowhere else). clip: clip x0_hat to [-1, 1], the range of images (not of latents, so
        not by default: a caller asks for it). t_max: start the reverse process at that index instead of T-1,
        from x_T as the chain's state there (SDEdit). The defaults are the project's default sampler: DDIM, 20
        steps, eta 1."""
        if x_T is None:
            if device is None:
                device = generator.device if generator is not None else "cpu"
            x_T = torch.randn(shape, generator=generator, device=device)
        ts = self.timesteps(sampler, steps, spacing, t_max)
        if sampler == "ddpm":
            return self.ddpm_sample(model, x_T, ts, generator, callback, clip, var_type)
        if sampler == "ddim":
            return self.ddim_sample(model, x_T, ts, generator, callback, clip, eta)
        return self.dpm_solver_sample(model, x_T, ts, generator, callback, clip, sde=sampler == "dpm++sde")

    # -------------------------------------------------------------------------
    # editing: inpainting and SDEdit

    @staticmethod
    def repaint_path(steps, jump_length=10, jump_n_sample=10):
        """The positions on the sub-sequence tau (steps - 1 = the noisiest, -1 = the clean image) that
        RePaint's chain visits, [RePaint] sec. 4.2: it goes down one position at a time, and at every
        jump_length-th position it goes back up jump_length positions and down again, jump_n_sample - 1
        times."""
        path = [steps - 1]
        for p in reversed(range(-1, steps - 1)):
            path.append(p)
            if p >= 0 and p % jump_length == 0 and p + jump_length <= steps - 1:
                for _ in range(jump_n_sample - 1):  # up to p + jump_length, then down to p again
                    path += list(range(p + 1, p + jump_length + 1))
                    path += list(range(p + jump_length - 1, p - 1, -1))
        return path

    @torch.no_grad()
    def repaint(self, model, x_T, x_known, mask, steps=250, jump_length=10, jump_n_sample=10, generator=None,
                clip=False, callback=None):
        """Inpainting by [RePaint] Algorithm 1 on `steps` of the T timesteps. x_known (B, C, H, W); mask 1
        where x_known is kept, 0 where the model fills in (broadcast to x_known). A step down is ancestral
        sampling on the sub-sequence (DDIM eta 1, which is DDPM on the respaced chain) for the unknown part
        and q(x_t | x_0) for the known part (Algorithm 1, lines 4-8); a step up is the forward process
        q(x_t' | x_t) (line 10). Returns the clean image, which equals x_known exactly where mask is 1.
        callback(t, x, x0_hat) after every step down."""
        # on the host: no GPU sync per step
        taus, alphas_cumprod = self.ddim_timesteps(steps).tolist(), self.alphas_cumprod.tolist()
        alpha_bar = lambda p: alphas_cumprod[taus[p]] if p >= 0 else 1.0  # at a position on tau
        x = x_T
        path = self.repaint_path(len(taus), jump_length, jump_n_sample)
        for p, q in zip(path[:-1], path[1:]):
            z = torch.randn(x.shape, generator=generator, device=x.device)
            if q < p:  # down: the model denoises the unknown part, the forward process noises the known part
                t_q = taus[q] if q >= 0 else -1
                x_unknown, x0 = self.ddim_step(model, x, taus[p], t_q, 1.0, generator, clip)
                # eq. 4 (line 5)
                x_known_t = math.sqrt(alpha_bar(q)) * x_known + math.sqrt(1 - alpha_bar(q)) * z
                x = mask * x_known_t + (1 - mask) * x_unknown  # line 8
                if callback:
                    callback(taus[p], x, x0)
            else:  # up: x_{t'} ~ N(sqrt(alpha_bar' / alpha_bar) x_t, (1 - alpha_bar' / alpha_bar) I), eq. 4
                r = alpha_bar(q) / alpha_bar(p)
                x = math.sqrt(r) * x + math.sqrt(1 - r) * z
        return x

    def sdedit(self, model, x_init, strength, noise, **sample_kwargs):
        """SDEdit [SDEdit] sec. 3: noise the image to t_0 = strength * T with q(x_t0 | x_0) (eq. 4), then run
        the reverse process from t_0. Strength 0 returns x_init; strength 1 starts from the noise itself,
        which is plain sampling from that noise. sample_kwargs go to sample()."""
        if not 0 <= strength <= 1:
            raise ValueError(f"SDEdit strength must be in [0, 1], got {strength}")
        n_steps = round(strength * self.T)  # how many of the T forward steps are applied
        if n_steps == 0:
            return x_init
        if n_steps == self.T:
            return self.sample(model, x_init.shape, x_T=noise, **sample_kwargs)
        t0 = torch.full((x_init.shape[0],), n_steps - 1, device=x_init.device, dtype=torch.long)
        x_t0 = self.q_sample(x_init, t0, noise)
        return self.sample(model, x_init.shape, x_T=x_t0, t_max=n_steps - 1, **sample_kwargs)

    # -------------------------------------------------------------------------
    # likelihood: the variational bound of [DDPM] eq. 5, in bits per dimension

    def model_log_variance(self, t, x, var_type="beta"):
        # log sigma_t^2 of p(x_{t-1} | x_t): beta_t or beta_tilde_t ([DDPM] sec. 3.2). At t = 0, where
        # beta_tilde is 0, both use beta_tilde of index 1 (as improved-diffusion does) for the decoder's
        # width.
        beta = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
        return self._at(torch.log(beta) if var_type == "beta" else self.posterior_log_variance_clipped, t, x)

    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image, in bits/dim."""
        a = self.alphas_cumprod[-1].item()
        log_var = torch.tensor(math.log(1 - a), dtype=torch.float64)
        kl = normal_kl(math.sqrt(a) * x0.double(), log_var, 0.0, torch.zeros((), dtype=torch.float64))
        return kl.mean(dim=list(range(1, x0.dim()))) / math.log(2)

    def vb_term_bpd(self, model, x0, t, noise, var_type="beta"):
        """One term of the bound per image, in bits/dim: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ||
        p(x_{t-1} | x_t)) where t > 0, and L_0 = -log p(x_0 | x_1) under the discretised decoder where t = 0
        (our index 0)."""
        xt = self.q_sample(x0, t, noise)
        mean, _, _ = self.p_mean_variance(model, xt, t, False, var_type)
        logvar = self.model_log_variance(t, xt, var_type).double()
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, xt, t)
        kl = normal_kl(true_mean.double(), true_logvar.double(), mean.double(), logvar)
        nll = -discretized_gaussian_log_likelihood(x0.double(), mean.double(), 0.5 * logvar)
        dims = list(range(1, x0.dim()))
        return torch.where(t == 0, nll.mean(dims), kl.mean(dims)) / math.log(2)

    @torch.no_grad()
    def bits_per_dim(self, model, x0, generator=None, var_type="beta", t_samples=None):
        """The bound of [DDPM] eq. 5 per image, in bits/dim, as dict(prior=L_T, vb=sum of L_{t-1} over t > 0,
        decoder=L_0, total). x0 in [-1, 1] on the 256-level grid. t_samples=None evaluates every t (T model
        calls per image); an integer K gives an unbiased estimate of the sum from K random t, one in each of K
        slices of 1..T-1 whose widths grow geometrically, since most of the bound sits at small t (K = T-1 is
        every t once)."""
        B, device = x0.shape[0], x0.device
        def term(t):  # t: (B,)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            return self.vb_term_bpd(model, x0, t, noise, var_type)
        full = lambda i: torch.full((B,), i, device=device, dtype=torch.long)
        if t_samples is None or self.T == 1:  # every t (T = 1 has no L_t)
            vb = sum(term(full(i)) for i in range(1, self.T))
        else:  # a random t per image in each slice [lo, hi), times its size: E[(hi - lo) L_t] is its sum
            K = min(t_samples, self.T - 1)
            # edges 1 = e_0 < e_1 < ... < e_K = T: each slice holds >= 1 t
            k = torch.arange(K + 1, dtype=torch.float64)
            edges = 1 + k + (self.T - 1 - K) * (self.T ** (k / K) - 1) / (self.T - 1)
            edges = edges.round().long().tolist()
            vb = sum((hi - lo) * term(torch.randint(lo, hi, (B,), generator=generator, device=device))
                     for lo, hi in zip(edges[:-1], edges[1:]))
        prior, decoder = self.prior_bpd(x0), term(full(0))
        return dict(prior=prior, vb=vb, decoder=decoder, total=prior + vb + decoder)

# -----------------------------------------------------------------------------
# training: the objective that a training loop optimises, one step at a time


def drop_condition(attrs, gen, batch_size, shard, p_uncond, p_drop="uniform", rare=None):
    """Condition dropout ([CFG] Algorithm 1, line 3): (B/world, K) 0/1 attributes -> +1 present, -1 absent, 0
    dropped, drawn from `gen` for the global batch of `batch_size` (this rank's `shard` kept). Each attribute
    is dropped with probability p_drop, 'uniform' (a rate drawn from U(0, 1) per image) or 'balanced' (the
    same, but an attribute in its `rare` state stays unless all are dropped: Eyeglasses, on 7% of faces, is
    then shown as present whenever a face has them); the whole condition with probability p_uncond."""
    B = batch_size
    K = attrs.shape[1]
    uniform = p_drop in ("uniform", "balanced")
    rate = torch.rand(B, 1, generator=gen, device=attrs.device) if uniform else p_drop
    keep = (torch.rand(B, K, generator=gen, device=attrs.device) >= rate)[shard]  # each attribute on its own
    if p_drop == "balanced":
        keep |= attrs == rare
    keep &= (torch.rand(B, 1, generator=gen, device=attrs.device) >= p_uncond)[shard]  # the whole condition
    return (attrs.float() * 2 - 1) * keep


class Denoising:
    """A DDPM's training objective, [DDPM] Algorithm 1 lines 3-5: a timestep and the noise for each image,
    drawn from the step's generator, and the loss of the model's prediction from x_t. On images, or on the
    latents of `first`, the first stage (autoencoder.FirstStage, or autoencoder.Pixels for images), which
    decodes what its samples draw. A conditional model's attributes are dropped as classifier-free guidance
    trains them. The loop that calls it does not ask which it holds: an autoencoder's Reconstruction has the
    same methods."""
    face_steps = 1000  # fewer training steps than this drew noise, not faces (REPORT sec. 3.5)
    val_passes = 1  # model evaluations per validation image

    def __init__(self, diffusion, first, shape, *, batch_size, shard, memory_format=torch.contiguous_format,
                 p_uncond=0.1, p_drop="uniform", rare=None, sample_steps=DEFAULT_STEPS, seed=0, drop=None,
                 cond_name="attrs"):
        self.diffusion = diffusion
        self.first = first
        self.shape = shape  # (C, H, W) of what the model learns: images, or latents
        self.batch_size = batch_size  # the global batch, of which this rank's `shard` is trained here
        self.shard = shard
        self.memory_format = memory_format
        self.p_uncond = p_uncond
        self.p_drop = p_drop
        self.rare = rare  # (K,) each attribute's rarer state, for p_drop 'balanced'
        self.drop = drop  # the condition's dropout, drop(cond, gen): a text model's; default: the attributes'
        if drop is None:
            self.drop = self.drop_attributes
        self.cond_name = cond_name  # the model's keyword for the condition: attrs, or a text model's text
        self.sample_steps = sample_steps  # of the grids' sampler, from the same noise every time (`seed`)
        self.seed = seed
        self.grid_evals = len(diffusion.timesteps(DEFAULT_SAMPLER, sample_steps))  # per grid image

    @staticmethod
    def probe_losses(model, x):
        """The per-image loss at t = 0 and zero noise: what a memory plan, a timing or a FLOP count runs."""
        t = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return GaussianDiffusion(2).to(x.device).training_losses(model, x, t, torch.zeros_like(x))

    def drop_attributes(self, attrs, gen):
        return drop_condition(attrs, gen, self.batch_size, self.shard, self.p_uncond, self.p_drop, self.rare)

    def losses(self, x0, cond, gen):
        """One step's loss: t and eps drawn from `gen` for the global batch, this rank's shard of x0 (B/world,
        C, H, W) kept; cond: its attributes (B/world, K) or a text model's tokens (B/world, L), or None. -> a
        function of the model: its per-image loss (B/world,)."""
        B = self.batch_size
        t = torch.randint(0, self.diffusion.T, (B,), generator=gen, device=x0.device)[self.shard]  # line 3
        noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=x0.device)[self.shard]  # line 4
        noise = noise.contiguous(memory_format=self.memory_format)
        kwargs = None
        if cond is not None:  # [CFG] Algorithm 1 line 3: the condition dropped at random
            kwargs = {self.cond_name: self.drop(cond, gen)}
        return lambda model: self.diffusion.training_losses(model, x0, t, noise, model_kwargs=kwargs)

    @torch.no_grad()
    def grid(self, ema, examples, n, batch, ctx, callback=None, inputs=None):
        """n samples of the model `ema`, from the same noise at every call (x_T and every later z), decoded.
        examples: unused (an autoencoder's grid shows its reconstructions of them). callback(images done)
        after each step; inputs: the model's other inputs per sample, {keyword: (n, ...)} (a ControlNet's
        hints). -> (images in [-1, 1], images per row, model evaluations made)."""
        x_T = torch.randn((n, *self.shape), generator=torch.Generator().manual_seed(self.seed))
        device = self.diffusion.betas.device
        g = torch.Generator(device=device).manual_seed(self.seed + 1)
        done = 0
        drawn = []
        for x in x_T.to(device).split(batch):
            def count(*_):
                nonlocal done
                done += len(x)
                if callback:
                    callback(done)
            model = ema
            if inputs:  # those of these samples
                first = len(drawn) * batch
                model = functools.partial(ema, **{k: v[first:first + len(x)] for k, v in inputs.items()})
            with ctx:
                z = self.diffusion.sample(model, x.shape, DEFAULT_SAMPLER, self.sample_steps, DEFAULT_ETA, g,
                                          x_T=x, clip=self.first.clip, callback=count)
                drawn.append(self.first.decode(z))
        return torch.cat(drawn), round(math.sqrt(n)), n * self.grid_evals

    def val_losses(self, ema, x0, cond, g, ctx):
        """The loss of `ema` on validation images (or latents) x0 and their condition (or None), t and noise
        from `g`. -> (losses, None)."""
        t = torch.randint(0, self.diffusion.T, (len(x0),), generator=g, device=x0.device)
        kwargs = None
        if cond is not None:
            kwargs = {self.cond_name: cond}
        with ctx:
            noise = torch.randn(x0.shape, generator=g, device=x0.device)
            return self.diffusion.training_losses(ema, x0, t, noise, model_kwargs=kwargs), None

    def forward(self, ema, x):
        """One model evaluation as a grid makes it (what --minutes prices grids and validation by)."""
        return ema(x, torch.zeros(len(x), dtype=torch.long, device=x.device))
