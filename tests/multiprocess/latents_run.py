"""The latents stage of tests/test_pipeline.py's tiny config in one of several processes joined by
jax.distributed (LDAE_* env), on a workdir whose autoencoder has trained; prints `RESULT <summary json>`."""

import json
import pathlib
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "workdir with a trained autoencoder")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: the tiny configs
  from test_pipeline import tiny_pipeline_config  # pylint: disable=g-import-not-at-top
  from ldae_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  from ldae_jax.training import latents_stage  # pylint: disable=g-import-not-at-top
  config = tiny_pipeline_config()
  distributed.maybe_initialize(config.distributed)
  summary = latents_stage.run(config, _WORKDIR.value)
  print("RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":
  app.run(main)
