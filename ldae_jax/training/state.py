"""Train state, optimizer and EMA as plain pytrees.

Step functions are `jax.jit`-compiled pure functions that take and return a `TrainState`; NNX modules live
only inside them (`nnx.merge` of a static graphdef with the arrays held here). Keeping every array in plain
nested dicts (`nnx.to_pure_dict`) makes the state one uniform pytree that orbax saves, reshards and restores
without knowing about NNX, and that `param_shardings` can place leaf by leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from flax import struct

PyTree = Any


class TrainState(struct.PyTreeNode):
  """Everything a stage needs to continue exactly where it stopped.

  Attributes:
    step: optimizer steps taken (int32 scalar).
    params: trainable arrays (pure dict, or a dict of pure dicts when a stage trains several networks).
    opt_state: optax state of `params`.
    ema: exponential moving average of `params` (same structure), or None when the stage keeps none.
    rest: non-trainable arrays the step may update or needs (BatchNorm statistics, a frozen UNet).
    key: raw uint32 PRNG key data of the run; each step folds in its step number, so a resumed run draws
      the same noise as an uninterrupted one.
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  ema: PyTree
  rest: PyTree
  key: jax.Array


def split_model(module: nnx.Module, trainable: Any = nnx.Param):
  """Splits a module into (graphdef, trainable, rng_state, rest), the three states as pure dicts.

  The module's own RNG streams are kept apart (and out of checkpoints): steps always pass fresh
  `nnx.Rngs` derived from `TrainState.key`, so the stored streams are never advanced.
  """
  graphdef, params, rngs, rest = nnx.split(module, trainable, nnx.RngState, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rngs), nnx.to_pure_dict(rest)


def abstract_model(build: Callable[[], nnx.Module], trainable: Any = nnx.Param):
  """`split_model` of the module `build()` makes, without initialising its weights: restore targets.

  Returns (graphdef, params, rngs, rest) with params and rest as ShapeDtypeStructs (`nnx.eval_shape`). The RNG
  streams are real arrays: a merged module needs them and no checkpoint holds them. They are the values a real
  `build()` gives, computed by a jit whose only outputs are the streams, so XLA drops the weight initialisers.
  """
  graphdef, params, _, rest = split_model(nnx.eval_shape(build), trainable)
  rngs = jax.jit(lambda: split_model(build(), trainable)[2])()
  return graphdef, params, rngs, rest


def merge_model(graphdef, params: PyTree, rngs: PyTree, rest: PyTree) -> nnx.Module:
  """Inverse of `split_model` (inside or outside jit)."""
  return nnx.merge(graphdef, params, rngs, rest)


def module_rest(module: nnx.Module, trainable: Any = nnx.Param) -> PyTree:
  """The non-trainable, non-RNG arrays of `module` after it ran (e.g. updated BatchNorm statistics)."""
  _, _, _, rest = nnx.split(module, trainable, nnx.RngState, ...)
  return nnx.to_pure_dict(rest)


def make_optimizer(cfg: ml_collections.ConfigDict, lr: float | None = None) -> optax.GradientTransformation:
  """Adam (no weight decay) after global-norm clipping, at a constant lr (the reference's settings) or, with
  `cfg.lr_schedule == "cosine"`, cosine-decayed from lr to 0 over `cfg.steps` optimizer steps.

  Args:
    cfg: a `config.train.<stage>` block (b1, b2, eps, clip_norm, lr, lr_schedule, steps).
    lr: overrides `cfg.lr` (the discriminator's `lr_disc`).
  """
  lr = cfg.lr if lr is None else lr
  if lr <= 0:
    raise ValueError(f"learning rate {lr} must be > 0 (config.train.*.lr / lr_disc).")
  schedule = cfg.get("lr_schedule", "constant")
  if schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, decay_steps=max(1, int(cfg.steps)))
  elif schedule != "constant":
    raise ValueError(f"config.train.*.lr_schedule={schedule!r}: 'constant' or 'cosine'.")
  adam = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  if cfg.clip_norm and cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)
  return adam


def ema_update(ema: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf (float32 arithmetic)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def ema_step(ema: PyTree, old_params: PyTree, new_params: PyTree, decay: float, *, updates: int = 1) -> PyTree:
  """EMA bookkeeping for one optimizer step.

  `updates=1` is one update towards the new parameters (our default). The reference updates its EMA after
  every micro-batch (docs/fidelity.md, "Reference bugs"): with `updates=k` accumulation micro-batches, k-1
  updates see the unchanged `old_params` and the last one the stepped `new_params` (effective decay decay**k
  per optimizer step).
  """
  for _ in range(updates - 1):
    ema = ema_update(ema, old_params, decay)
  return ema_update(ema, new_params, decay)


def step_key(state: TrainState, salt: int = 0) -> jax.Array:
  """The step's PRNG key: fold(run key, step, salt); depends on nothing but the step number."""
  key = jax.random.wrap_key_data(state.key, impl="threefry2x32")
  return jax.random.fold_in(jax.random.fold_in(key, state.step), salt)


def raw_key(seed: int) -> jax.Array:
  """uint32 key data for `TrainState.key` (plain arrays checkpoint and reshard like any other leaf)."""
  return jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))


def create_state(params: PyTree, rest: PyTree, tx: optax.GradientTransformation | dict, *, seed: int,
                 with_ema: bool) -> TrainState:
  """A step-0 state. `tx` may be a dict of optimizers matching a dict of parameter groups."""
  if isinstance(tx, dict):
    opt_state = {k: tx[k].init(params[k]) for k in tx}
  else:
    opt_state = tx.init(params)
  ema = jax.tree.map(jnp.array, params) if with_ema else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, ema=ema, rest=rest,
                    key=raw_key(seed))


def count_params(tree: PyTree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def microbatches(batch: PyTree, accum: int) -> PyTree:
  """(accum*B, ...) -> (accum, B, ...), micro-batch j holding rows j, accum+j, ... of each device's block.

  Reshaping to (B, accum) first keeps every micro-batch row on the device that holds it under a
  data-parallel sharding of axis 0, so the split moves no data between devices.
  """
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} is not divisible by grad_accum={accum} (config.train.*.grad_accum).")
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def accumulate_grads(grad_fn, params: PyTree, rest: PyTree, batch: PyTree, key: jax.Array, accum: int):
  """Mean gradient and metrics over `accum` micro-batches with one `lax.scan`, threading `rest`.

  `grad_fn(params, rest, micro_batch, key) -> (grads, rest, metrics)`; micro-batch j gets `fold_in(key, j)`
  and sees the `rest` (BatchNorm statistics) left by micro-batch j-1, as sequential micro-batches would.
  With accum == 1 the function is called directly (no scan in the graph). Returns (grads, rest, metrics).
  """
  if accum == 1:
    return grad_fn(params, rest, batch, jax.random.fold_in(key, 0))
  micro = microbatches(batch, accum)

  def body(carry, xs):
    g_sum, m_sum, r = carry
    j, mb = xs
    g, r, m = grad_fn(params, r, mb, jax.random.fold_in(key, j))
    return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, m), r), None

  g0, _, m0 = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], micro), key)
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
  (g, m, rest), _ = jax.lax.scan(body, (zeros(g0), zeros(m0), rest), (jnp.arange(accum), micro))
  inv = 1.0 / accum
  return jax.tree.map(lambda x: x * inv, g), rest, jax.tree.map(lambda x: x * inv, m)


def make_train_step(loss_fn, tx: optax.GradientTransformation, *, accum: int, ema_decay: float,
                    ema_updates: int = 1, refresh_rest=None):
  """The optimizer step the diffusion stages share, as a pure `(state, batch) -> (state, metrics)`.

  Mean gradient of `loss_fn(params, rest, micro_batch, key) -> scalar` over `accum` micro-batches
  (`accumulate_grads`), one optax update (clipping lives in `tx`), the EMA (`ema_step`, `ema_updates` updates
  per optimizer step), metrics {loss, grad_norm}. `refresh_rest(weights, rest, batch) -> rest`, if given, runs
  after the update on the weights the evaluation uses (the EMA, else the parameters): running statistics that
  must describe those weights.
  """
  def grad_fn(params, rest, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch, key)
    return grads, rest, {"loss": loss}

  def step(state: TrainState, batch):
    grads, rest, metrics = accumulate_grads(grad_fn, state.params, state.rest, batch, step_key(state), accum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else ema_step(state.ema, state.params, params, ema_decay, updates=ema_updates)
    if refresh_rest is not None:
      rest = refresh_rest(params if ema is None else ema, rest, batch)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rest=rest), metrics

  return step
