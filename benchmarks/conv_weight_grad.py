"""The weight gradient of the UNet's folded 3D convolutions (one NHWC 2D convolution over kD*C channels, see
`ldae_jax.models.conv`) in XLA's form and in the matmul forms that could replace it, at the LDM step's shapes per
CPU device (batch 8 of 16, depth folded into the batch), one thread: the forms are checked against each other.

    taskset -c 1 python3 benchmarks/conv_weight_grad.py

Forms: `xla` (jax.vjp of the 2D convolution; XLA transposes the operands and runs a YNNPACK convolution),
`taps_einsum` (one einsum per 3x3 tap over a shifted slice), `im2col` (all 9 taps side by side, one matmul),
`taps_dot_gT` (per tap, the output gradient transposed first, then a dot). The forward convolution is timed beside.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# (N = batch 8 x depth 8, H, W, kD*C folded input channels, O): the UNet's costliest weight gradients.
SHAPES = ((64, 10, 8, 192, 64), (64, 10, 8, 288, 32), (64, 10, 8, 96, 32), (64, 5, 4, 192, 64))
DN = ("NHWC", "HWIO", "NHWC")


def median_ms(f, *args, n: int = 20) -> float:
  c = jax.jit(f).lower(*args).compile()
  jax.block_until_ready(c(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(c(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def forms(h: int, w: int, k: int, o: int):
  conv = lambda x, kern: lax.conv_general_dilated(x, kern, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def xla(x, g):
    return jax.vjp(lambda kern: conv(x, kern), jnp.zeros((3, 3, k, o), x.dtype))[1](g)[0]

  def taps_einsum(x, g):
    xp = pad(x)
    return jnp.stack([jnp.stack([jnp.einsum("nhwk,nhwo->ko", xp[:, a:a + h, b:b + w], g) for b in range(3)])
                      for a in range(3)])

  def im2col(x, g):
    xp = pad(x)
    cols = jnp.concatenate([xp[:, a:a + h, b:b + w] for a in range(3) for b in range(3)], -1).reshape(-1, 9 * k)
    return (cols.T @ g.reshape(-1, o)).reshape(3, 3, k, o)

  def taps_dot_gT(x, g):
    xp, gt = pad(x), g.reshape(-1, o).T
    return jnp.stack([jnp.stack([jnp.dot(gt, xp[:, a:a + h, b:b + w].reshape(-1, k)).T for b in range(3)])
                      for a in range(3)])

  return conv, {"xla": xla, "taps_einsum": taps_einsum, "im2col": im2col, "taps_dot_gT": taps_dot_gT}


def main() -> None:
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; ms per call (GFLOP/s)")
  for n, h, w, k, o in SHAPES:
    x = jax.random.normal(jax.random.key(0), (n, h, w, k))
    g = jax.random.normal(jax.random.key(1), (n, h, w, o))
    conv, fns = forms(h, w, k, o)
    gflop = 2 * n * h * w * k * o * 9 / 1e9
    ref = np.asarray(fns["xla"](x, g))
    row = []
    for name, f in fns.items():
      np.testing.assert_allclose(np.asarray(f(x, g)), ref, rtol=2e-3, atol=2e-2 * float(np.abs(ref).max()) / 100)
      ms = median_ms(f, x, g)
      row.append(f"{name} {ms:.1f} ({gflop / ms * 1e3:.0f})")
    fwd = median_ms(conv, x, jax.random.normal(jax.random.key(2), (3, 3, k, o)))
    print(f"{n}x{h}x{w}, {k}->{o} ({gflop:.2f} GFLOP): " + ", ".join(row)
          + f"; forward {fwd:.1f} ({gflop / fwd * 1e3:.0f})", flush=True)


if __name__ == "__main__":
  main()
