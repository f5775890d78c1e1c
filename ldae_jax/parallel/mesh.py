"""Device mesh, shardings and FSDP rules: how arrays are laid out over the devices of all processes.

One `Mesh` with axes ('data', 'fsdp') serves every stage. Batches are split along their leading dimension
over both axes (an FSDP group is also a data-parallel group, so every device sees different examples).
Parameters, optimizer state and EMA are either replicated on every device or, in 'fsdp' mode, each large
array is split along one dimension over the 'fsdp' axis and replicated over 'data'; XLA then inserts the
all-gathers before use and the reduce-scatters of the gradients. Small arrays (biases, norms, the
optimizer step count) stay replicated: splitting them costs more in collectives than it saves in memory.

The rules work on any pytree of arrays or `jax.ShapeDtypeStruct`s, so one call covers an `nnx.State`, an
optax state and an EMA copy alike; shardings are computed from shapes only, before anything is allocated.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)  # shown by the CLIs (ldae_jax.cli.common.setup_logging)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over both axes (data-major): data x fsdp devices each get B / n examples.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

PyTree = Any


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int]:
  """Resolves `config.mesh.{data,fsdp}` (-1 = the remaining devices) to a (data, fsdp) shape.

  Pure function of the config and a device count, so it is testable without devices. Every device must
  belong to the mesh: a mesh over a subset would silently idle accelerators (and, with several processes,
  leave some processes without devices in the mesh).
  """
  sizes = {ax: int(getattr(mesh_config, ax)) for ax in MESH_AXES}
  for ax, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{ax}={s}: must be a positive axis size or -1 (fill with the remaining "
                       f"devices).")
  fill = [ax for ax, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}; set e.g. "
                     f"--config.mesh.fsdp=1 or a fixed size.")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {sizes}: the fixed axis sizes (product {known}) do not divide the {num_devices} "
          f"devices; choose sizes whose product divides {num_devices}.")
    sizes[fill[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f"config.mesh {sizes}: data x fsdp = {known} but there are {num_devices} devices; the product must "
        f"equal the device count (or set one axis to -1 to fill).")
  return sizes[DATA_AXIS], sizes[FSDP_AXIS]


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """`jax.make_mesh` with axes ('data', 'fsdp') sized by `config.mesh` over all (global) devices.

  Axis types are set to `Auto` explicitly: JAX 0.10+ defaults `make_mesh` to `Explicit` axes (sharding in
  types), under which unannotated model code (convolutions, reshapes) must state every output sharding.
  With `Auto` axes the jit in/out shardings are enough and XLA propagates the rest, on JAX 0.10 and 0.11.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES), devices=devices)
  return jax.make_mesh(shape, MESH_AXES, devices=devices)  # pragma: no cover (JAX without AxisType)


def local_mesh_splitting(batch_size: int) -> Mesh:
  """A data-parallel mesh over this process's devices when they split `batch_size` evenly, else over the first
  of them: for per-process work (evaluation, benchmarks) whose batches need not fit the training mesh."""
  devices = jax.local_devices()
  if batch_size % len(devices):
    devices = devices[:1]
  return make_mesh(types.SimpleNamespace(data=-1, fsdp=1), devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that keeps a full copy of the array on every device of `mesh`."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); the other dimensions whole.

  The spec names only the first dimension, so the same sharding serves a volume batch `(B, X, Y, Z, 1)`, a
  latent batch, labels `(B,)` and timesteps alike.
  """
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_device(global_batch: int, mesh: Mesh) -> int:
  """B / (data x fsdp); raises when the global batch does not split evenly over the batch axes."""
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if global_batch % n:
    raise ValueError(f"global batch size {global_batch} (config.train.<stage>.batch_size) is not divisible "
                     f"by data x fsdp = {n} devices; use a multiple of {n}.")
  return global_batch // n


def _shape_of(x: Any) -> tuple[int, ...] | None:
  shape = getattr(x, "shape", None)
  return None if shape is None else tuple(int(s) for s in shape)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """The FSDP partition spec of one array of `shape`: which dimension, if any, to split over 'fsdp'.

  Rule: arrays with fewer than `min_size` elements, or with no dimension divisible by the fsdp axis size,
  stay replicated. Otherwise the largest divisible dimension is split; ties go to the later dimension, so a
  conv kernel (kx, ky, kz, C_in, C_out) with C_in == C_out is split along its output channels (contiguous
  per-device slices, and the matching bias/norm would be split the same way if it were large enough).
  """
  shape = tuple(shape)
  if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_size:
    return P()
  candidates = [(size, i) for i, size in enumerate(shape) if size >= fsdp_size and size % fsdp_size == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def param_shardings(tree: PyTree, mesh: Mesh, mode: str = "replicate", min_size: int = 2**16) -> PyTree:
  """A pytree of `NamedSharding` matching `tree` (arrays or ShapeDtypeStructs): replicated or FSDP.

  Works for `nnx.State` (the shardings sit inside the same Variable wrappers, as jit's in/out_shardings
  expect), optax states and plain dicts. Scalars and non-array leaves are replicated. `mode` and
  `min_size` come from `config.mesh.param_sharding` and `config.mesh.fsdp_min_size`.
  """
  if mode not in ("replicate", "fsdp"):
    raise ValueError(f"param_shardings mode={mode!r} (config.mesh.param_sharding): 'replicate' or 'fsdp'.")
  if FSDP_AXIS not in mesh.shape:
    raise ValueError(f"mesh axes {tuple(mesh.shape)} lack the {FSDP_AXIS!r} axis; build it with make_mesh().")
  fsdp_size = mesh.shape[FSDP_AXIS]

  def one(x: Any) -> NamedSharding:
    shape = _shape_of(x)
    if mode == "replicate" or shape is None:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

  return jax.tree.map(one, tree)


def shardings_from_config(tree: PyTree, mesh: Mesh, mesh_config: Any) -> PyTree:
  """`param_shardings` with mode and min_size read from `config.mesh`."""
  return param_shardings(tree, mesh, mode=mesh_config.param_sharding, min_size=int(mesh_config.fsdp_min_size))


def _put_one(x: Any, sharding: NamedSharding) -> jax.Array:
  """Places one host value (identical on every process) or jax.Array on `sharding`.

  With several processes a sharding is not fully addressable; `jax.device_put` of host data onto it is
  not supported on every JAX version, so each process builds only its own shards from its (identical)
  copy via `make_array_from_callback`. A global jax.Array is resharded with `device_put`.
  """
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or sharding.is_fully_addressable):
    return jax.device_put(x, sharding)
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_like(tree: PyTree, shardings: PyTree) -> PyTree:
  """Puts every array of `tree` on the matching sharding of `shardings` (same structure, e.g. from
  `param_shardings(tree, ...)`). Host values must be identical on all processes (same seed)."""
  return jax.tree.map(_put_one, tree, shardings)


def process_batch_slice(sharding: NamedSharding, global_batch: int) -> slice:
  """The rows [start, stop) of a global batch that this process must load for `sharding`.

  `make_array_from_process_local_data` expects each process to pass the rows of its addressable devices;
  which rows those are depends on the mesh's device order. The mesh keeps each process's devices
  contiguous along the batch axes, so the rows form one contiguous block (checked here).
  """
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  rows = set()
  for idx in index_map.values():
    sl = idx[0]
    rows.update(range(*sl.indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {sorted(rows)} under "
                     f"{sharding}; build the mesh with make_mesh() so each process's devices are adjacent.")
  return slice(start, stop)


def global_batch_from_local(local_batch: PyTree, sharding: NamedSharding) -> PyTree:
  """Assembles global jax.Arrays from each process's own rows (a pytree of host arrays).

  Every process calls this with its `process_batch_slice` of the batch (the per-process batch is
  global_batch / process_count); the global leading dimension is inferred. On one process this is a
  plain sharded device_put. String fields (subject, scan_id, diagnosis) cannot live on devices: they are
  returned unchanged as process-local numpy arrays.
  """
  def one(x):
    x = np.asarray(x)
    return x if x.dtype.kind in "USO" else jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(one, local_batch)


class AotCompiled(NamedTuple):
  """An ahead-of-time compiled function with its compile time and XLA's FLOP estimate.

  Callable like the compiled function; unpacks as `compiled, seconds, flops = compile_aot(...)`.
  """
  compiled: Any
  seconds: float
  flops: float | None

  def __call__(self, *args, **kwargs):
    return self.compiled(*args, **kwargs)


def _cost_flops(compiled: Any) -> float | None:
  """Total FLOPs from XLA's cost analysis; None where the backend gives none (a dict or, on older JAX, a
  list of per-computation dicts)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (backends may not implement it)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def compile_aot(jitted_fn: Callable[..., Any], *abstract_args: Any, name: str = "step",
                **abstract_kwargs: Any) -> AotCompiled:
  """`jitted_fn.lower(*args).compile()`, logging the compile time and the FLOPs per call.

  Compiling before the loop starts makes the (for a 3D UNet, minutes-long) compile visible in the logs
  instead of hiding it in the first step's time, and it fails fast on shape or sharding mistakes. Args
  may be `jax.ShapeDtypeStruct`s (with `sharding=`) or real arrays.
  """
  t0 = time.perf_counter()
  lowered = jitted_fn.lower(*abstract_args, **abstract_kwargs)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  flops = _cost_flops(compiled)
  if flops is None:
    log.info("compiled %s in %.2f s (no XLA cost analysis)", name, seconds)
  else:
    log.info("compiled %s in %.2f s; XLA cost analysis: %.4g GFLOP per call", name, seconds, flops / 1e9)
  return AotCompiled(compiled, seconds, flops)


def abstract_with_sharding(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree` carrying `shardings`: the arguments `compile_aot` lowers with."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
