"""DDIM / DDPM loops: replay of the reference trajectories (`ddim_tiny`), oracle invariants, tracing, networks."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import OPTIMIZED
from ldae_jax.config import default_config
from ldae_jax.diffusion import ddim, schedule

CALLS = {  # call -> (encode?, shifted?)
    "unet_sample": (False, False),
    "unet_encode": (True, False),
    "shift_sample": (False, True),
    "shift_encode": (True, True),
}


def ndhwc(x: np.ndarray) -> np.ndarray:
  """NCDHW -> NDHWC on the last five axes (keeps a leading step axis)."""
  return np.moveaxis(x, -4, -1)


def atol_for(call: str) -> float:
  return 5e-3 if "encode" in call else 1e-3  # README section 7 (encode outputs reach magnitude 50)


@pytest.fixture(scope="module")
def sched():
  return schedule.make_schedule(default_config().diffusion)


@pytest.fixture(scope="module")
def ddim10(sched):
  return schedule.ddim_schedule(sched, 10)


def replay_fn(fixture: dict, call: str, shifted: bool):
  """model_fn returning the reference's recorded network output for the step whose timestep it receives."""
  eps = jnp.asarray(ndhwc(fixture[f"out/traj/{call}/eps"]))
  shift = jnp.asarray(ndhwc(fixture[f"out/traj/{call}/shift"])) if shifted else None
  t_rec = jnp.asarray(fixture[f"out/traj/{call}/t"][:, 0], jnp.int32)

  def fn(x, t):
    i = jnp.argmax(t_rec == t[0])
    return (eps[i], shift[i]) if shifted else eps[i]

  return fn


@pytest.mark.parametrize("call", list(CALLS))
def test_replay_reproduces_reference_trajectory(call, ddim10, load_fixture):
  f = load_fixture("ddim_tiny")
  encode, shifted = CALLS[call]
  x_in = ndhwc(f["in/x_0"] if encode else f["in/x_T"])
  loop = ddim.encode if encode else ddim.sample
  out, traj = loop(replay_fn(f, call, shifted), x_in, ddim10, shifted=shifted, return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(traj["t"]), f[f"out/traj/{call}/t"])
  # x_t at every step (the network input), then the final output.
  np.testing.assert_allclose(np.asarray(traj["x_t"]), ndhwc(f[f"out/traj/{call}/x_t"]), rtol=0,
                             atol=atol_for(call))
  np.testing.assert_allclose(np.asarray(out), ndhwc(f[f"out/{call}"]), rtol=0, atol=atol_for(call))
  assert out.dtype == jnp.float32 and set(traj) == ({"x_t", "t", "eps", "shift"} if shifted else
                                                    {"x_t", "t", "eps"})
  if encode:  # the k=0 clamp amplification (reference fact): magnitudes ~50 are reproduced, not avoided
    assert float(jnp.abs(out).max()) > 40


def oracle(sched, x0: jax.Array, g: jax.Array | None = None):
  """The exact noise of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n (plus sqrt(1-abar_t) G when shifted)."""

  def fn(x, t):
    a = sched.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    s = sched.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    eps = (x - a * x0) / s
    return eps if g is None else (eps + s * g, g)

  return fn


@pytest.fixture(scope="module")
def oracle_setup(ddim10):
  rng = np.random.default_rng(0)
  shape = (2, 2, 3, 2, 3)
  x0 = jnp.asarray(rng.uniform(-0.9, 0.9, shape), jnp.float32)
  n = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  a = np.asarray(ddim10.alphas_cumprod)
  level = lambda k: np.sqrt(a[k]) * x0 + np.sqrt(1 - a[k]) * n  # noqa: E731
  return x0, n, level(0), level(10)


@pytest.mark.parametrize("clamp", [True, False])
def test_oracle_sample_and_encode_follow_the_noise_path(sched, ddim10, oracle_setup, clamp):
  """With the exact noise, DDIM maps level S to level 0 and back along x0 + n (|x0| < 1: clamp inactive)."""
  x0, _, x_lo, x_hi = oracle_setup
  fn = oracle(sched, x0)
  np.testing.assert_allclose(np.asarray(ddim.sample(fn, x_hi, ddim10, clamp=clamp)), x_lo, atol=2e-4)
  np.testing.assert_allclose(np.asarray(ddim.encode(fn, x_lo, ddim10, clamp=clamp)), x_hi, atol=2e-4)


def test_shift_uses_ddim_coefficient_and_stop_percent(sched, ddim10, oracle_setup):
  x0, n, x_lo, x_hi = oracle_setup
  g = jnp.asarray(np.random.default_rng(1).standard_normal(x0.shape), jnp.float32)
  fn = oracle(sched, x0, g)  # eps - sqrt(1 - abar_k) G is the exact noise again
  np.testing.assert_allclose(np.asarray(ddim.sample(fn, x_hi, ddim10, shifted=True)), x_lo, atol=2e-4)
  np.testing.assert_allclose(np.asarray(ddim.encode(fn, x_lo, ddim10, shifted=True)), x_hi, atol=2e-4)
  # stop_percent=1: the shift is never applied, which equals the plain loop on the eps output alone.
  no_shift = ddim.sample(fn, x_hi, ddim10, shifted=True, stop_percent=1.0)
  plain = ddim.sample(lambda x, t: fn(x, t)[0], x_hi, ddim10)
  np.testing.assert_array_equal(np.asarray(no_shift), np.asarray(plain))
  # stop_percent=0.5: shift on for k = 10..6 only -> differs from both.
  half = np.asarray(ddim.sample(fn, x_hi, ddim10, shifted=True, stop_percent=0.5))
  assert np.abs(half - x_lo).max() > 1e-3 and np.abs(half - np.asarray(plain)).max() > 1e-3


def test_clamp_range_and_clamp_effect(sched, ddim10, oracle_setup):
  x0, _, x_lo, x_hi = oracle_setup
  big = 1.5 * x0 / jnp.abs(x0).max()  # |x0| up to 1.5 -> the [-1, 1] clamp is active
  fn = oracle(sched, big)
  a = np.asarray(ddim10.alphas_cumprod)
  n = (x_hi - np.sqrt(a[10]) * x0) / np.sqrt(1 - a[10])
  start = np.sqrt(a[10]) * big + np.sqrt(1 - a[10]) * n
  want = np.sqrt(a[0]) * big + np.sqrt(1 - a[0]) * n
  np.testing.assert_allclose(np.asarray(ddim.sample(fn, start, ddim10, clamp_range=2.0)), want, atol=2e-4)
  clamped = np.asarray(ddim.sample(fn, start, ddim10))
  assert np.abs(clamped - want).max() > 0.1 and np.abs(clamped).max() < 1.2


def test_model_output_dtype_and_errors(ddim10, oracle_setup):
  x_hi = oracle_setup[3]
  out = ddim.sample(lambda x, t: jnp.zeros_like(x, jnp.bfloat16), x_hi, ddim10)
  assert out.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"\(eps, G\)"):
    ddim.sample(lambda x, t: jnp.zeros_like(x), x_hi, ddim10, shifted=True)
  with pytest.raises(ValueError, match="stop_percent"):
    ddim.sample(lambda x, t: (x, x), x_hi, ddim10, shifted=True, stop_percent=1.5)


def test_compiles_once_for_repeated_calls(ddim10, oracle_setup):
  traces = []

  def fn(x, t):
    traces.append(1)  # runs only while tracing
    return 0.1 * x * (t[:, None, None, None, None] / 1000.0)

  x = oracle_setup[3]
  a = ddim.sample(fn, x, ddim10)
  b = ddim.sample(fn, x + 1.0, ddim10)
  ddim.encode(fn, x, ddim10)
  ddim.encode(fn, x - 1.0, ddim10)
  assert len(traces) == 2  # one trace of the scan body per loop kind, none per call
  assert not np.allclose(np.asarray(a), np.asarray(b))


class _TinyNet(nnx.Module):
  """eps = Dense(x) * t/1000: enough to check NNX split/merge inside jit."""

  def __init__(self, c: int, rngs: nnx.Rngs):
    self.lin = nnx.Linear(c, c, rngs=rngs)

  def __call__(self, x, t):
    return self.lin(x) * (t.astype(jnp.float32) / 1000.0).reshape(-1, 1, 1, 1, 1)


def test_inside_jit_with_nnx_state_as_argument(ddim10, oracle_setup):
  model = _TinyNet(3, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  traces = []

  @jax.jit
  def run(state, x):
    traces.append(1)
    net = nnx.merge(graphdef, state)
    return ddim.sample(lambda x, t: net(x, t), x, ddim10)

  x = oracle_setup[3]
  out1 = run(state, x)
  state2 = jax.tree.map(lambda p: p * 0.5, state)
  out2 = run(state2, x)
  assert len(traces) == 1
  np.testing.assert_allclose(np.asarray(out1), np.asarray(ddim.sample(lambda x, t: model(x, t), x, ddim10)),
                             atol=1e-6)
  assert not np.allclose(np.asarray(out1), np.asarray(out2))


def test_ddpm_sample_oracle_and_keys():
  cfg = ml_collections.ConfigDict(dict(timesteps=50, beta_schedule="linear", beta_start=1e-4, beta_end=0.2,
                                       pdae_gamma=0.1))
  s = schedule.make_schedule(cfg)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 2, 2, 2, 3)), jnp.float32)
  x_T = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
  # With the exact noise the t=0 posterior mean is x0 itself (coefficients 1 and 0), whatever the noise.
  out = ddim.ddpm_sample(oracle(s, x0), x_T, s, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-4)
  zero = lambda x, t: jnp.zeros_like(x)  # noqa: E731
  a = ddim.ddpm_sample(zero, x_T, s, jax.random.key(1), clamp=False)
  b = ddim.ddpm_sample(zero, x_T, s, jax.random.key(1), clamp=False)
  c = ddim.ddpm_sample(zero, x_T, s, jax.random.key(2), clamp=False)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2 and np.all(np.isfinite(np.asarray(a)))


# ------------------------------------------------------------------ end to end with the real networks
def _have(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def materialise(model):
  """Gives an `nnx.eval_shape` model concrete (unused, deterministic=True) dropout RNG state."""
  st = nnx.state(model, nnx.Any(nnx.RngKey, nnx.RngCount))
  for _, var in nnx.to_flat_state(st):
    var.set_value(jax.random.key(0) if isinstance(var, nnx.RngKey) else jnp.zeros((), jnp.uint32))
  nnx.update(model, st)
  return model


def tiny_network(load_fixture, kind: str):
  """The fixture's tiny UNet ("unet") or ShiftUNet ("shift_unet"), weights converted from the reference."""
  if not (_have(f"ldae_jax.models.{kind}") and _have(f"ldae_jax.convert.{kind}")):
    pytest.skip(f"ldae_jax.models.{kind} / ldae_jax.convert.{kind} not available yet")
  convert = importlib.import_module(f"ldae_jax.convert.{kind}").convert
  cls = importlib.import_module(f"ldae_jax.models.{kind}")
  if kind == "unet":
    make = lambda: cls.UNet(3, 32, (1, 2, 3), 1, (2, 4), num_heads=1, dropout=0.1, rngs=nnx.Rngs(0))  # noqa: E731
  else:
    make = lambda: cls.ShiftUNet(3, 32, (1, 2, 3), 1, (2, 4), latent_dim=16, num_heads=1,  # noqa: E731
                                 dropout=0.1, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(make)  # no random init: every parameter is overwritten by the conversion
  f = load_fixture(f"{kind}_tiny")
  convert({k[len("param/"):]: v for k, v in f.items() if k.startswith("param/")}, model)
  return materialise(model)


@pytest.fixture(scope="module")
def tiny_unet(load_fixture):
  return tiny_network(load_fixture, "unet")


@pytest.fixture(scope="module")
def tiny_shift_unet(load_fixture):
  return tiny_network(load_fixture, "shift_unet")


@pytest.mark.slow
def test_unet_ddim10_end_to_end(tiny_unet, ddim10, load_fixture):
  f = load_fixture("ddim_tiny")
  graphdef, state = nnx.split(tiny_unet)

  @functools.partial(jax.jit, compiler_options=OPTIMIZED)
  def loops(state, x_T, x_0):
    net = nnx.merge(graphdef, state)
    fn = lambda x, t: net(x, t)  # noqa: E731
    enc = ddim.encode(fn, x_0, ddim10)
    # One sampling scan for both starts (batch elements are independent): x_T and the encoded x_0.
    both = ddim.sample(fn, jnp.concatenate([x_T, enc]), ddim10)
    return both[:2], enc, both[2:]

  sample, enc, auto = loops(state, ndhwc(f["in/x_T"]), ndhwc(f["in/x_0"]))
  np.testing.assert_allclose(np.asarray(sample), ndhwc(f["out/unet_sample"]), atol=1e-3)
  np.testing.assert_allclose(np.asarray(enc), ndhwc(f["out/unet_encode"]), atol=5e-3)
  np.testing.assert_allclose(np.asarray(auto), ndhwc(f["out/unet_autoencode"]), atol=1e-3)


@pytest.mark.slow
def test_shift_unet_ddim10_end_to_end(tiny_shift_unet, ddim10, load_fixture):
  f = load_fixture("ddim_tiny")
  graphdef, state = nnx.split(tiny_shift_unet)

  @functools.partial(jax.jit, compiler_options=OPTIMIZED)
  def loops(state, x_T, x_0, y):
    net = nnx.merge(graphdef, state)
    enc = ddim.encode(lambda x, t: net(x, t, y), x_0, ddim10, shifted=True)
    y2 = jnp.concatenate([y, y])  # one sampling scan for both starts: x_T and the encoded x_0
    both = ddim.sample(lambda x, t: net(x, t, y2), jnp.concatenate([x_T, enc]), ddim10, shifted=True)
    return both[:2], enc, both[2:]

  sample, enc, auto = loops(state, ndhwc(f["in/x_T"]), ndhwc(f["in/x_0"]), jnp.asarray(f["in/y"]))
  np.testing.assert_allclose(np.asarray(sample), ndhwc(f["out/shift_sample"]), atol=1e-3)
  np.testing.assert_allclose(np.asarray(enc), ndhwc(f["out/shift_encode"]), atol=5e-3)
  np.testing.assert_allclose(np.asarray(auto), ndhwc(f["out/shift_autoencode"]), atol=1e-3)
