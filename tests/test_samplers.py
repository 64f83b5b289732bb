"""rCM and flow-matching UniPC samplers: schedules, determinism, cancel, and numerical agreement with
diffusers' UniPC and with an analytic probability-flow ODE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turbodiffusion_core.errors import Cancelled
from turbodiffusion_core.sampling.rcm import rcm_sample, rcm_timesteps
from turbodiffusion_core.sampling.unipc import WAN_SIGMA_MAX, flow_schedule, unipc_sample

SHAPE = (2, 4, 3, 6, 8)  # [B, C, F, H, W], tiny

# reference/turbodiffusion.md §5.2 (RF times, 5 decimals)
TD_TABLE = {
    80.0: [0.98765, 0.93378, 0.85290, 0.60898],
    200.0: [0.99502, 0.93378, 0.85290, 0.60898],
}


# ------------------------------------------------------------------------------------------------
# rCM
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_max", [80.0, 200.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_rcm_timesteps_match_turbodiffusion_table(steps, sigma_max):
    expected = TD_TABLE[sigma_max][:steps] + [0.0]
    got = rcm_timesteps(steps, sigma_max)
    assert len(got) == steps + 1
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("steps", [0, 5, -1])
def test_rcm_timesteps_rejects_unsupported_step_counts(steps):
    with pytest.raises(ValueError):
        rcm_timesteps(steps, 80.0)


def _recording_denoiser(calls: list):
    def denoise(x, t_in, i, t_cur):
        calls.append((x.dtype, t_in.clone(), i, t_cur))
        return 0.5 * x.float() - 0.1
    return denoise


@pytest.mark.parametrize(
    "sigma_max, fed",
    [(80.0, [988.0, 932.0, 852.0, 608.0]), (200.0, [996.0, 932.0, 852.0, 608.0])],
)
def test_rcm_feeds_bf16_timesteps(sigma_max, fed):
    calls: list = []
    rcm_sample(_recording_denoiser(calls), SHAPE, steps=4, sigma_max=sigma_max,
               generator=torch.Generator().manual_seed(0), device="cpu")
    assert [c[2] for c in calls] == [0, 1, 2, 3]
    for (x_dtype, t_in, _, _), value in zip(calls, fed):
        assert x_dtype == torch.bfloat16
        assert t_in.dtype == torch.bfloat16 and t_in.shape == (SHAPE[0],)
        assert t_in.float().tolist() == [value] * SHAPE[0]
    assert [c[3] for c in calls] == pytest.approx(rcm_timesteps(4, sigma_max)[:-1])


def test_rcm_sde_is_deterministic_per_seed_and_differs_across_seeds():
    def run(seed):
        return rcm_sample(_recording_denoiser([]), SHAPE, steps=4, sigma_max=80.0,
                          generator=torch.Generator().manual_seed(seed), device="cpu")
    a, b, c = run(1), run(1), run(2)
    assert a.dtype == torch.float32 and a.shape == SHAPE
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_rcm_sde_draws_fresh_noise_on_every_step_including_the_last():
    steps = 3
    gen = torch.Generator().manual_seed(5)
    rcm_sample(_recording_denoiser([]), SHAPE, steps=steps, sigma_max=80.0, generator=gen, device="cpu")
    ref = torch.Generator().manual_seed(5)
    for _ in range(steps + 1):  # initial noise + one per step
        torch.randn(*SHAPE, generator=ref, dtype=torch.float32)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_rcm_ode_is_deterministic_and_draws_only_the_initial_noise():
    gen = torch.Generator().manual_seed(3)
    a = rcm_sample(_recording_denoiser([]), SHAPE, steps=4, sigma_max=80.0, generator=gen, device="cpu", ode=True)
    ref = torch.Generator().manual_seed(3)
    torch.randn(*SHAPE, generator=ref, dtype=torch.float32)
    assert torch.equal(gen.get_state(), ref.get_state())
    b = rcm_sample(_recording_denoiser([]), SHAPE, steps=4, sigma_max=80.0,
                   generator=torch.Generator().manual_seed(3), device="cpu", ode=True)
    sde = rcm_sample(_recording_denoiser([]), SHAPE, steps=4, sigma_max=80.0,
                     generator=torch.Generator().manual_seed(3), device="cpu")
    assert torch.equal(a, b)
    assert not torch.allclose(a, sde)


@pytest.mark.parametrize("ode", [False, True])
def test_rcm_recovers_the_data_point_with_the_exact_velocity(ode):
    """For data concentrated at one point x0 the exact velocity is (x - x0) / t; both updates must
    land on x0 (SDE: its last step re-noises with weight t_next = 0; ODE: Euler is exact here)."""
    target = torch.linspace(-1, 1, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)

    def exact(x, t_in, i, t_cur):
        return (x - target) / t_cur

    out = rcm_sample(exact, SHAPE, steps=3, sigma_max=80.0, generator=torch.Generator().manual_seed(0),
                     device="cpu", ode=ode, model_dtype=torch.float64)
    assert torch.allclose(out.double(), target, atol=1e-6)


def test_rcm_cancel_raises_between_steps():
    calls: list = []
    checks = iter([False, False, True])
    with pytest.raises(Cancelled):
        rcm_sample(_recording_denoiser(calls), SHAPE, steps=4, sigma_max=80.0,
                   generator=torch.Generator().manual_seed(0), device="cpu", should_cancel=lambda: next(checks))
    assert len(calls) == 2


def test_rcm_progress_and_expert_selection_hooks():
    """select_fn sees t_cur before each step: the Wan2.2 A14B rule (low-noise expert once t < 0.9)
    gives 2 high + 2 low steps at sigma_max 200 (reference/turbodiffusion.md §5.4)."""
    experts: list[str] = []
    progress: list[tuple[int, int, float]] = []
    used: list[str] = []

    def select(i, t_cur):
        experts.append("low" if t_cur < 0.9 else "high")

    def denoise(x, t_in, i, t_cur):
        used.append(experts[-1])
        return torch.zeros_like(x, dtype=torch.float32)

    rcm_sample(denoise, SHAPE, steps=4, sigma_max=200.0, generator=torch.Generator().manual_seed(0),
               device="cpu", select_fn=select, on_step=lambda *a: progress.append(a))
    assert used == ["high", "high", "low", "low"]
    assert [p[:2] for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [p[2] for p in progress] == pytest.approx(rcm_timesteps(4, 200.0)[:-1])


# ------------------------------------------------------------------------------------------------
# UniPC / Euler
# ------------------------------------------------------------------------------------------------
def test_flow_schedule_matches_wan_timesteps():
    sched = flow_schedule(50, 5.0)
    assert sched.timesteps[:4] == (999, 995, 991, 987)
    assert sched.timesteps[-1] == 92
    assert len(sched.timesteps) == 50 and len(sched.sigmas) == 51
    assert sched.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sched.sigmas, sched.sigmas[1:]))


def _toy_field(seed: int = 0):
    bias = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * 0.3

    def field(x, t_in, i, sigma):
        return 0.5 * torch.tanh(x) + bias * (1.0 + sigma) - 0.2 * x
    return field


@pytest.mark.parametrize("steps, shift", [(1, 5.0), (2, 5.0), (3, 3.0), (10, 5.0), (20, 8.0)])
def test_unipc_matches_diffusers_on_the_same_sigma_grid(steps, shift):
    from diffusers import UniPCMultistepScheduler

    field = _toy_field()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2,
        solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )
    # Force the original Wan grid (diffusers' own default would be linspace(1, 1/1000)).
    scheduler.set_timesteps(sigmas=np.linspace(WAN_SIGMA_MAX, 0.0, steps + 1)[:-1])
    ours = flow_schedule(steps, shift)
    assert scheduler.timesteps.tolist() == list(ours.timesteps)
    assert torch.equal(scheduler.sigmas, torch.tensor(ours.sigmas, dtype=torch.float32))

    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(field(x, t, i, float(scheduler.sigmas[i])), t, x).prev_sample
    out = unipc_sample(field, noise.clone(), steps=steps, shift=shift)
    assert out.dtype == noise.dtype
    assert torch.allclose(out, x, atol=1e-5, rtol=0)


def _gaussian_problem(mu: float = 0.7, s: float = 0.4):
    """Data N(mu, s^2) per element: the probability-flow ODE keeps the standardized value z fixed,
    x_sigma = (1 - sigma) mu + D(sigma) z with D = sqrt((1 - sigma)^2 s^2 + sigma^2), so the exact
    velocity is dx/dsigma and the exact endpoint is mu + s z."""

    def d(sig):
        return math.sqrt((1 - sig) ** 2 * s * s + sig * sig)

    def velocity(x, t_in, i, sig):
        d_prime = (sig - (1 - sig) * s * s) / d(sig)
        return -mu + d_prime * (x - (1 - sig) * mu) / d(sig)

    z = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def error(steps: int, solver: str) -> float:
        sig0 = flow_schedule(steps, 1.0).sigmas[0]
        start = (1 - sig0) * mu + d(sig0) * z
        out = unipc_sample(velocity, start, steps=steps, shift=1.0, solver=solver)
        return (out - (mu + s * z)).abs().max().item()

    return error


def test_unipc_converges_to_the_analytic_endpoint_at_second_order():
    error = _gaussian_problem()
    e50, e100 = error(50, "unipc"), error(100, "unipc")
    assert e50 < 3e-3
    assert e100 < e50 / 3.0  # second order: about 4x smaller per doubling
    assert error(50, "euler") > 5 * e50


def test_euler_is_first_order_on_the_analytic_problem():
    error = _gaussian_problem()
    e50, e100 = error(50, "euler"), error(100, "euler")
    assert e100 < e50 / 1.7
    assert e100 < 0.03


def test_unipc_applies_classifier_free_guidance():
    cond, uncond = _toy_field(0), _toy_field(1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))

    def guided(x, t_in, i, sigma):
        u = uncond(x, t_in, i, sigma)
        return u + 4.0 * (cond(x, t_in, i, sigma) - u)

    a = unipc_sample(cond, noise, steps=6, shift=5.0, guidance_scale=4.0, uncond_fn=uncond)
    b = unipc_sample(guided, noise, steps=6, shift=5.0)
    c = unipc_sample(cond, noise, steps=6, shift=5.0)
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)
    with pytest.raises(ValueError):
        unipc_sample(cond, noise, steps=6, shift=5.0, guidance_scale=4.0)


def test_unipc_feeds_truncated_int_timesteps_and_reports_progress():
    seen: list[torch.Tensor] = []
    progress: list[tuple] = []

    def field(x, t_in, i, sigma):
        seen.append(t_in.clone())
        return torch.zeros_like(x)

    unipc_sample(field, torch.zeros(SHAPE), steps=5, shift=5.0, on_step=lambda *a: progress.append(a))
    sched = flow_schedule(5, 5.0)
    assert all(t.dtype == torch.int64 and t.shape == (SHAPE[0],) for t in seen)
    assert [int(t[0]) for t in seen] == list(sched.timesteps)
    assert [p[:2] for p in progress] == [(i, 5) for i in range(1, 6)]
    assert [p[2] for p in progress] == pytest.approx(sched.sigmas[:-1])


def test_euler_with_constant_velocity_moves_by_sigma0():
    v = torch.full(SHAPE, 0.25)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    out = unipc_sample(lambda x, t, i, s: v, noise, steps=7, shift=3.0, solver="euler")
    sigma0 = flow_schedule(7, 3.0).sigmas[0]
    assert torch.allclose(out, noise - sigma0 * v, atol=1e-6)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_unipc_cancel_raises_between_steps(solver):
    calls: list[int] = []
    checks = iter([False, True])

    def field(x, t_in, i, sigma):
        calls.append(i)
        return torch.zeros_like(x)

    with pytest.raises(Cancelled):
        unipc_sample(field, torch.zeros(SHAPE), steps=4, shift=5.0, solver=solver,
                     should_cancel=lambda: next(checks))
    assert calls == [0]
