"""Diffusion core: schedules (float64 masters, reference-exact float32 tables), losses, DDIM, interpolation.

  schedule.make_schedule(config.diffusion) -> GaussianSchedule;  schedule.ddim_schedule(base, S) -> DDIMSchedule
  losses.q_sample / eps_loss / pdae_loss
  ddim.sample / encode (one jit-compiled lax.scan each) / ddpm_sample
  interpolate.lerp / slerp / manipulate
"""

from ldae_jax.diffusion import ddim, interpolate, losses, schedule
from ldae_jax.diffusion.schedule import DDIMSchedule, GaussianSchedule, ddim_schedule, make_schedule

__all__ = ["ddim", "interpolate", "losses", "schedule", "DDIMSchedule", "GaussianSchedule", "ddim_schedule",
           "make_schedule"]
