"""One of two processes joined by jax.distributed (LDAE_* env) that save, or restore, one checkpoint together:
a replicated array and this process's grain iterator, which sits at a different position on each process
(3 + 4 * process_index), as the slices of a sharded data stream do. Restoring prints `POSITION <next element>`."""

import sys

from absl import app, flags

_DIR = flags.DEFINE_string("dir", None, "checkpoint directory (shared by the processes)", required=True)
_MODE = flags.DEFINE_enum("mode", "save", ["save", "restore"], "what to do")


def main(argv):
  del argv
  import grain  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ldae_jax.config import default_config  # pylint: disable=g-import-not-at-top
  from ldae_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  from ldae_jax.training.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(default_config().distributed)
  assert jax.process_count() == 2, jax.process_count()
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("d",)),
                                          jax.sharding.PartitionSpec())
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  ck = Checkpointer(_DIR.value, asynchronous=True)
  if _MODE.value == "save":
    for _ in range(3 + 4 * jax.process_index()):
      next(iterator)
    values = np.arange(4.0, dtype=np.float32)
    state = {"w": jax.make_array_from_callback(values.shape, replicated, lambda index: values[index])}
    ck.save(1, state, iterator)
    next(iterator)  # moving on after the save must not change what was saved
  else:
    target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated)}
    state = ck.restore(target, iterator=iterator)
    assert np.asarray(state["w"].addressable_data(0)).tolist() == [0.0, 1.0, 2.0, 3.0]
    print(f"POSITION {int(next(iterator))}", flush=True)
  ck.close()
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
