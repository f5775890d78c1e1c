"""One of two processes joined by jax.distributed (LDAE_* env); `--die` exits before the barrier, without a
shutdown, as a crashed host would. The other prints how its barrier ended."""

import os
import sys
import time

from absl import app, flags

_DIE = flags.DEFINE_bool("die", False, "exit before the barrier")
_TIMEOUT = flags.DEFINE_float("timeout_s", 5.0, "barrier timeout")


def main(argv):
  del argv
  from ldae_jax.config import default_config  # pylint: disable=g-import-not-at-top
  from ldae_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(default_config().distributed)
  distributed.barrier("both started", _TIMEOUT.value * 10)
  if _DIE.value:
    os._exit(3)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  try:
    distributed.barrier("after the peer died", _TIMEOUT.value)
  except TimeoutError as e:
    print(f"BARRIER_ERROR after {time.perf_counter() - t0:.1f} s: {e}", flush=True)
    os._exit(2)  # pylint: disable=protected-access  # the distributed shutdown would abort on the dead peer
  print("BARRIER_PASSED", flush=True)
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
