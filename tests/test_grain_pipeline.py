"""grain_pipeline.batched: the one training stream of latent shards and volumes, on any random-access source."""

import numpy as np
import pytest

from ldae_jax.data import grain_pipeline


class _Source:
  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"i": np.int64(i)}


def _epoch(pi, pc, n=23, batch=4, **kw):
  ds = grain_pipeline.batched(_Source(n), global_batch_size=batch, seed=7, repeat=False, process_index=pi,
                              process_count=pc, **kw)
  return [b["i"].tolist() for b in ds]


def test_processes_read_disjoint_whole_global_batches_of_one_shuffle():
  one = _epoch(0, 1)
  a, b = _epoch(0, 2), _epoch(1, 2)
  assert len(a) == len(b) == len(one) == 23 // 4  # the epoch is cut to whole global batches on every process
  assert all(len(x) == 2 for x in a + b)
  flat = lambda bs: [i for x in bs for i in x]  # noqa: E731
  assert not set(flat(a)) & set(flat(b))
  assert sorted(flat(a) + flat(b)) == sorted(flat(one))  # the same records as one process reads
  assert flat(one) != sorted(flat(one))  # shuffled


def test_repeat_reshuffles_each_epoch_and_resumes_from_its_state():
  it = iter(grain_pipeline.batched(_Source(8), global_batch_size=8, seed=3, process_index=0, process_count=1))
  e1, e2 = next(it)["i"].tolist(), next(it)["i"].tolist()
  assert sorted(e1) == sorted(e2) == list(range(8)) and e1 != e2
  state = it.get_state()
  want = next(it)["i"].tolist()
  it2 = iter(grain_pipeline.batched(_Source(8), global_batch_size=8, seed=3, process_index=0, process_count=1))
  it2.set_state(state)
  assert next(it2)["i"].tolist() == want


@pytest.mark.parametrize("kw, match", [
    (dict(global_batch_size=3, process_count=2), "multiple of process_count=2"),
    (dict(global_batch_size=0), "positive multiple"),
    (dict(seed=-1), "0 <= seed"),
    (dict(process_index=2, process_count=2), "must lie in"),
    (dict(num_workers=-1), ">= 0"),
])
def test_bad_arguments_name_the_argument(kw, match):
  args = dict(global_batch_size=2, seed=0, process_index=0, process_count=1)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    grain_pipeline.batched(_Source(4), **args)
