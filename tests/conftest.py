"""Shared test fixtures.

The reference test vectors live in `../shared/reference` beside the checkout (or wherever
LDAE_REFERENCE_DIR points). A user's clone has no such folder: tests that need it skip with the reason.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

# Tests compare float32 ports with reference numbers: never let a GPU's TF32 matmuls leak in.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# The suite is mostly XLA compile time on a CPU, and tests check values, not speed: LLVM at -O0 compiles about
# 30 % faster (tests/test_shift_unet.py 46 -> 32 s on the 2-core dev CPU). Set before JAX starts its backend;
# the tests that start subprocesses with their own XLA_FLAGS pass the same flag (FAST_COMPILE_FLAG).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()
# For the few tests that run a network many times (DDIM loops), execution outweighs compilation at -O0:
# `jax.jit(..., compiler_options=OPTIMIZED)` compiles them at XLA's default level.
OPTIMIZED = {"xla_backend_optimization_level": 2}

# Many tests lower the same tiny step (the stage tests' configs, a resumed run and its uninterrupted twin): a
# compilation cache for this pytest run compiles each once (tests/test_training.py + 5 other stage modules:
# 221 -> 202 s on the 2-core dev CPU). A fresh folder per run, removed at exit: nothing carries between runs.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="ldae-test-jax-cache-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
import jax  # noqa: E402  # pylint: disable=g-import-not-at-top,wrong-import-position
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]


def reference_dir() -> pathlib.Path | None:
  env = os.environ.get("LDAE_REFERENCE_DIR")
  candidates = [pathlib.Path(env)] if env else []
  candidates.append(REPO.parent / "shared" / "reference")
  for c in candidates:
    if (c / "README.md").exists():
      return c
  return None


@pytest.fixture(scope="session")
def refdir() -> pathlib.Path:
  d = reference_dir()
  if d is None:
    pytest.skip("reference test vectors not found: set LDAE_REFERENCE_DIR or place them at ../shared/reference")
  return d


@pytest.fixture(scope="session")
def load_fixture(refdir):
  """load_fixture('unet_tiny') -> dict of numpy arrays from `<refdir>/unet_tiny.npz`."""
  cache = {}

  def load(name: str) -> dict[str, np.ndarray]:
    if name not in cache:
      with np.load(refdir / f"{name}.npz") as z:
        cache[name] = {k: z[k] for k in z.files}
    return cache[name]

  return load


@pytest.fixture(scope="session")
def paper_listing(refdir):
  """paper_listing('unet_paper.txt') -> {torch key: zeros of its shape} for every entry of a reference
  state-dict listing (parameters, buffers and duplicate registrations), as read-only broadcast views so a
  paper-size network costs no memory."""
  import json  # pylint: disable=import-outside-toplevel

  def load(name: str) -> dict[str, np.ndarray]:
    sd = {}
    for line in (refdir / "state_dicts" / name).read_text().splitlines():
      if line.startswith("#") or line.startswith("total_unique_parameters"):
        continue
      key, shape, dtype, _ = line.split("\t")
      sd[key] = np.broadcast_to(np.zeros((), dtype), tuple(json.loads(shape)))
    return sd

  return load
