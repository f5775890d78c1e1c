"""The one grain pipeline behind every training stream (latent shards and preprocessed volumes):

  source -> [global seeded shuffle, reshuffled every epoch] -> [repeat] -> process slice -> batch
  -> to_iter_dataset(threads) -> [mp_prefetch(workers)]

The shuffle is global and identical on every process (same seed), and each process then takes every
`process_count`-th element of the shuffled stream, so processes read disjoint records whose union is the
epoch. The iterator's `get_state()` is a small JSON-able dict; `grain.checkpoint.CheckpointSave(it)` saves it
with orbax. `ldae_jax.parallel.mesh.global_batch_from_local` turns a process-local batch into global
`jax.Array`s.
"""

from __future__ import annotations


def ensure_absl_flags_parsed() -> None:
  """grain reads its absl flags in worker threads; outside an absl app they are unparsed and would raise."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def batched(source, *, global_batch_size: int, seed: int, shuffle: bool = True, repeat: bool = True,
            drop_remainder: bool = True, num_workers: int = 0, process_index: int | None = None,
            process_count: int | None = None, num_threads: int = 2, prefetch_batches: int = 4,
            worker_buffer_size: int = 2):
  """A grain `IterDataset` of process-local batches (global_batch_size / process_count records each) of a
  random-access `source` (`len` and `[i]`).

  Without `repeat` and with `drop_remainder` the epoch is cut to whole global batches before slicing, so that
  every process yields the same number of batches (an extra batch on one host would hang the others in the next
  collective). With `repeat` the stream runs on across epochs (each a new permutation), so when the record
  count is not a multiple of the batch, the batch that straddles an epoch boundary can hold one record twice.
  `num_workers` > 0 reads in that many grain worker processes (the same batches in the same order).
  """
  import grain  # pylint: disable=g-import-not-at-top
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count} (each process reads global/process_count records).")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed}: grain shuffling needs 0 <= seed < 2**32.")
  if num_workers < 0 or num_threads < 0:
    raise ValueError(f"num_workers={num_workers}, num_threads={num_threads}: must be >= 0.")
  n = len(source)
  ds = grain.MapDataset.source(source).seed(seed)
  if shuffle:
    ds = ds.shuffle()  # same permutation on every process; a new one each epoch
  if repeat:
    ds = ds.repeat()
  elif drop_remainder:
    ds = ds[:(n // global_batch_size) * global_batch_size]
  ds = ds[process_index::process_count]
  ds = ds.batch(global_batch_size // process_count, drop_remainder=drop_remainder)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                prefetch_buffer_size=max(prefetch_batches, num_threads)))
  if num_workers > 0:
    ensure_absl_flags_parsed()  # grain's worker processes read its absl flags
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=worker_buffer_size))
  return it_ds
