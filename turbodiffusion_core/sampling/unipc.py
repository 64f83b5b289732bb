"""Flow-matching UniPC (and Euler) for the original 50-step Wan checkpoints (reference/wan.md §5).

Wan's default solver is UniPC adapted to flow matching: order 2, B(h) = expm1 ("bh2"), updates on the
x0 prediction, the first step and the last step at order 1 (warm-up and `lower_order_final`), and the
UniC corrector after every model evaluation but the first. Noise level sigma runs from about 1 to 0 with
x_sigma = (1 - sigma) x0 + sigma eps; the DiT predicts v = eps - x0, so x0 = x - sigma v, and in the
UniPC notation alpha = 1 - sigma and lambda = log(alpha / sigma).

The sigma grid is the original's: linspace(sigma_max, 0, steps + 1)[:-1] with sigma_max = 0.999 as
float32 (the last entry of its 1000-entry training table), shifted by s' = shift s / (1 + (shift - 1) s),
then a final 0. The DiT is fed int64(sigma * 1000) (truncated) from the float64 grid, while the solver
uses the grid rounded to float32, as the original does. diffusers' `UniPCMultistepScheduler` with
`use_flow_sigmas` runs the same algorithm but on linspace(1, 1/1000, steps + 1)[:-1] unless given
the sigmas explicitly.

Classifier-free guidance is applied here when `uncond_fn` is given: v = v_u + g (v_c - v_u), as Wan does
(two batch-1 forwards a step). Without `uncond_fn`, `velocity_fn` must return the final velocity itself,
which is how a caller does anything fancier (a batched cond/uncond forward, per-expert scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Optional

from turbodiffusion_core.errors import Cancelled

if TYPE_CHECKING:
    import torch

NUM_TRAIN_TIMESTEPS = 1000

WAN_SIGMA_MAX = 0.9990000128746033
"""float32(0.999): the original reads its sigma_max back from a float32 tensor."""

VelocityFn = Callable[["torch.Tensor", "torch.Tensor", int, float], "torch.Tensor"]
"""velocity_fn(x, timestep [B] int64 = int(sigma*1000), step_index, sigma) -> v = eps - x0."""


@dataclass(frozen=True)
class FlowSchedule:
    """The solver's noise levels (steps + 1 values, last 0, float32-rounded) and the DiT's timesteps."""

    sigmas: tuple[float, ...]
    timesteps: tuple[int, ...]


def flow_schedule(steps: int, shift: float, sigma_max: float = WAN_SIGMA_MAX) -> FlowSchedule:
    """Wan's shifted flow-matching grid (module doc). 50 steps at shift 5 feed 999, 995, 991, ..., 92."""
    import numpy as np

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    base = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    shifted = shift * base / (1.0 + (shift - 1.0) * base)
    timesteps = tuple(int(t) for t in (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    sigmas = tuple(float(s) for s in np.append(shifted, 0.0).astype(np.float32))
    return FlowSchedule(sigmas=sigmas, timesteps=timesteps)


def _lam(sigma: float) -> float:
    """Half log-SNR of the flow path: log(alpha / sigma) with alpha = 1 - sigma."""
    return math.log(1.0 - sigma) - math.log(sigma)


def _unipc_order(step_index: int, steps: int) -> int:
    """Order 2, but 1 on the first step (no history yet) and on the last (lower_order_final)."""
    return min(2, step_index + 1, steps - step_index)


def _predict(x, x0_hist: list, sigmas: tuple[float, ...], i: int, order: int):
    """UniP-bh2 from sigmas[i] to sigmas[i + 1] using the x0 predictions at sigmas[i], sigmas[i - 1]."""
    s0, t = sigmas[i], sigmas[i + 1]
    m0 = x0_hist[-1]
    if t == 0.0:
        # lambda_t = +inf: the exact limit of the update is the x0 prediction (order 1 by construction).
        return m0.clone()
    h = _lam(t) - _lam(s0)
    b_h = math.expm1(-h)  # B(h) of bh2, which is also h*phi_1(-h) here
    x_t = (t / s0) * x - (1.0 - t) * b_h * m0
    if order == 2:
        r = (_lam(sigmas[i - 1]) - _lam(s0)) / h
        d1 = (x0_hist[-2] - m0) / r
        x_t = x_t - (1.0 - t) * b_h * 0.5 * d1
    return x_t


def _correct(x_prev, x_pred, m_new, x0_hist: list, sigmas: tuple[float, ...], i: int, order: int):
    """UniC-bh2: redo the step sigmas[i - 1] -> sigmas[i] with the new x0 prediction `m_new`."""
    s0, t = sigmas[i - 1], sigmas[i]
    m0 = x0_hist[-1]
    h = _lam(t) - _lam(s0)
    hh = -h
    b_h = math.expm1(hh)
    x_t = (t / s0) * x_prev - (1.0 - t) * b_h * m0
    if order == 1:
        return x_t - (1.0 - t) * b_h * 0.5 * (m_new - m0)
    # Order 2: weights rho solve [[1, 1], [r, 1]] rho = [b1, b2], the bh2 coefficients of UniC-2.
    r = (_lam(sigmas[i - 2]) - _lam(s0)) / h
    g1 = b_h / hh - 1.0  # phi-function terms of the exponential integrator at -h (UniPC paper, eq. for B(h))
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    rho0 = (b1 - b2) / (1.0 - r)
    rho1 = b1 - rho0
    d1 = (x0_hist[-2] - m0) / r
    return x_t - (1.0 - t) * b_h * (rho0 * d1 + rho1 * (m_new - m0))


def unipc_sample(
    velocity_fn: VelocityFn,
    noise: "torch.Tensor",
    *,
    steps: int,
    shift: float,
    guidance_scale: float = 1.0,
    uncond_fn: Optional[VelocityFn] = None,
    solver: Literal["unipc", "euler"] = "unipc",
    sigma_max: float = WAN_SIGMA_MAX,
    on_step: Optional[Callable[[int, int, float], None]] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
) -> "torch.Tensor":
    """Integrate from `noise` (the latent at the first sigma, i.e. pure noise) to x0.

    The latent stays in `noise`'s dtype and device. `should_cancel()` is checked before every step
    (True raises `Cancelled`); `on_step(done, total, sigma)` runs after each step. A
    `guidance_scale` other than 1 needs `uncond_fn` (see module doc); at exactly 1 the unconditional
    pass is skipped.
    """
    import torch

    if solver not in ("unipc", "euler"):
        raise ValueError(f"solver must be 'unipc' or 'euler', got {solver!r}")
    if uncond_fn is None and guidance_scale != 1.0:
        raise ValueError("guidance_scale != 1 needs uncond_fn (or apply the guidance in velocity_fn)")
    schedule = flow_schedule(steps, shift, sigma_max)
    sigmas = schedule.sigmas
    batch = noise.shape[0]

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t_in = torch.full((batch,), schedule.timesteps[i], dtype=torch.int64, device=x.device)
        v = velocity_fn(x, t_in, i, sigmas[i])
        if uncond_fn is not None and guidance_scale != 1.0:
            v_u = uncond_fn(x, t_in, i, sigmas[i])
            v = v_u + guidance_scale * (v - v_u)
        return v.to(x.dtype)

    x = noise
    x0_hist: list[torch.Tensor] = []
    x_before_predict: Optional[torch.Tensor] = None
    last_order = 0
    with torch.no_grad():
        for i in range(steps):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled before step {i + 1} of {steps}")
            v = velocity(x, i)
            if solver == "euler":
                x = x + (sigmas[i + 1] - sigmas[i]) * v
            else:
                m = x - sigmas[i] * v
                if i > 0:
                    x = _correct(x_before_predict, x, m, x0_hist, sigmas, i, last_order)
                x0_hist = (x0_hist + [m])[-2:]
                last_order = _unipc_order(i, steps)
                x_before_predict = x
                x = _predict(x, x0_hist, sigmas, i, last_order)
            if on_step is not None:
                on_step(i + 1, steps, sigmas[i])
    return x
