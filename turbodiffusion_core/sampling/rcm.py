"""rCM few-step sampler for the TurboDiffusion checkpoints (reference/turbodiffusion.md §5).

The Turbo DiTs are ordinary Wan rectified-flow velocity predictors (x_t = (1-t) x0 + t eps,
v = eps - x0, timestep input t*1000), distilled with rCM in TrigFlow time s (sigma = tan s). Sampling
walks a fixed TrigFlow schedule [atan(sigma_max), 1.5, 1.4, 1.0][:steps] + [0], converted to RF time
t = sin s / (sin s + cos s) = sigma / (1 + sigma). Each step predicts x0 = x - t v and re-noises it to
the next time with fresh noise (SDE, the default) or takes one Euler step (ODE). No CFG: one forward a
step. The arithmetic mirrors the reference so a seed reproduces its output: state in float64, noise in
float32 from one generator, model input in the model dtype, timesteps fed as bf16(t*1000) (so the 4-step
schedule at sigma_max 80 is fed as 988, 932, 852, 608).

Wan2.2 I2V A14B switches from the high-noise to the low-noise expert once t_cur < boundary
(§5.4). The sampler does not know about experts: `denoise_fn` receives t_cur and chooses, and
`select_fn(step_index, t_cur)` is called before each step for side effects such as moving one expert
off the GPU and the other onto it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from turbodiffusion_core.errors import Cancelled

if TYPE_CHECKING:
    import torch

TRIGFLOW_MID_TIMES = (1.5, 1.4, 1.0)
"""TrigFlow times after the first, "for better visual quality" (TurboDiffusion and rCM default)."""

MAX_STEPS = len(TRIGFLOW_MID_TIMES) + 1

DenoiseFn = Callable[["torch.Tensor", "torch.Tensor", int, float], "torch.Tensor"]
"""denoise_fn(x in model dtype, timestep [B] bf16 = t*1000, step_index, t_cur) -> velocity v."""


def rcm_timesteps(steps: int, sigma_max: float) -> list[float]:
    """RF times of the rCM schedule, `steps + 1` values from t0 = sigma_max / (1 + sigma_max) down to 0.

    Computed in float64 as sin/(sin+cos) of the TrigFlow list, like the reference.
    """
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"rCM supports 1 to {MAX_STEPS} steps, got {steps!r}")
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be positive, got {sigma_max!r}")
    trig = [math.atan(sigma_max), *TRIGFLOW_MID_TIMES[: steps - 1], 0.0]
    return [math.sin(s) / (math.sin(s) + math.cos(s)) for s in trig]


def rcm_timestep_input(t_cur: float, batch: int, device: Union[str, "torch.device"] = "cpu") -> "torch.Tensor":
    """The timestep tensor the DiT gets: [batch] bf16 of float32(t_cur) * 1000 (the reference's casts)."""
    import torch

    t32 = torch.tensor(t_cur, dtype=torch.float32).item()
    return torch.full((batch,), t32 * 1000.0, dtype=torch.float64, device=device).to(torch.bfloat16)


def rcm_sample(
    denoise_fn: DenoiseFn,
    noise_shape: Sequence[int],
    *,
    steps: int,
    sigma_max: float,
    generator: "torch.Generator",
    device: Union[str, "torch.device"],
    ode: bool = False,
    model_dtype: Optional["torch.dtype"] = None,
    on_step: Optional[Callable[[int, int, float], None]] = None,
    should_cancel: Optional[Callable[[], bool]] = None,
    select_fn: Optional[Callable[[int, float], object]] = None,
) -> "torch.Tensor":
    """Sample latents of `noise_shape` ([B, C, F, H, W]) with the rCM schedule; returns float32 on `device`.

    - `generator` seeds the initial noise and the per-step SDE noise (CPU or CUDA; noise is drawn on the
      generator's device as float32, then moved to `device`).
    - `model_dtype` (default bfloat16) is the dtype `x` is cast to for `denoise_fn`.
    - `should_cancel()` is checked before every step; True raises `Cancelled`.
    - `select_fn(step_index, t_cur)` runs before every step, after the cancel check (expert switching).
    - `on_step(done, total, t_cur)` runs after every step with the number of finished steps.
    """
    import torch

    model_dtype = torch.bfloat16 if model_dtype is None else model_dtype
    times = rcm_timesteps(steps, sigma_max)
    batch = int(noise_shape[0])

    def draw() -> torch.Tensor:
        eps = torch.randn(*noise_shape, generator=generator, device=generator.device, dtype=torch.float32)
        return eps.to(device)

    with torch.no_grad():
        x = draw().to(torch.float64) * times[0]
        for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:])):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"cancelled before step {i + 1} of {steps}")
            if select_fn is not None:
                select_fn(i, t_cur)
            v = denoise_fn(x.to(model_dtype), rcm_timestep_input(t_cur, batch, device), i, t_cur).to(torch.float64)
            if ode:
                x = x - (t_cur - t_next) * v
            else:
                x = (1.0 - t_next) * (x - t_cur * v) + t_next * draw()
            if on_step is not None:
                on_step(i + 1, steps, t_cur)
    return x.to(torch.float32)
