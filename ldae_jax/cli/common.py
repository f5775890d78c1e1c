"""What every command-line entry point does the same way: which log lines show, and how a user's mistake
(a bad manifest, a corrupt NIfTI, a missing checkpoint, a bad config value) ends the run.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

# Every mistake a user can fix raises one of these with a message naming the file or field and the fix:
# ManifestError, NiftiError, ConversionError and the config checks are ValueErrors; a missing file or
# checkpoint is a FileNotFoundError (OSError); diverging training raises FloatingPointError.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class _FirstProcessOnly(logging.Filter):
  """Passes records on process 0 only; before jax.distributed starts every process is its own process 0.

  (Asking for the process index earlier would start the backend and make jax.distributed.initialize fail.)
  """

  def filter(self, record: logging.LogRecord) -> bool:
    import jax  # pylint: disable=import-outside-toplevel
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def setup_logging(verbosity_given: bool) -> None:
  """The package's own INFO lines (compile time and FLOPs, checkpoints, distributed setup) on stderr, on
  process 0; the libraries' INFO lines (orbax, XLA) off unless `--verbosity` was given.

  The package logs through `logging.getLogger(__name__)` (not absl's logger, which orbax shares), so its
  lines get their own handler and level.
  """
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  if not verbosity_given:
    absl_logging.set_verbosity(absl_logging.WARNING)
  ours = logging.getLogger("ldae_jax")
  if not any(getattr(h, "_ldae_cli", False) for h in ours.handlers):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_FirstProcessOnly())
    handler._ldae_cli = True  # pylint: disable=protected-access
    ours.addHandler(handler)
  ours.setLevel(logging.INFO)
  ours.propagate = False  # not twice through absl's root handler


def print_on_first_process_only() -> None:
  """Sends the standard output of every process but process 0 to os.devnull, so that a multi-host run prints
  its progress and stage lines once, not once per host; standard error (warnings, errors) stays on each.
  Call it after jax.distributed is initialised."""
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    sys.stdout.flush()
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with


def use_compilation_cache(config) -> None:
  """Points JAX's persistent compilation cache at `config.compilation_cache_dir` when it is set (created if
  missing), so that a rerun, a resume or the evaluation loads its compiled programs instead of compiling again."""
  folder = str(config.compilation_cache_dir)
  if not folder:
    return
  import os  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  folder = os.path.abspath(os.path.expanduser(folder))
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)


def run_reporting_user_errors(fn: Callable[[], Any], *, verbose: bool, cleanup: Callable[[], None] | None = None):
  """Runs `fn`; a user error prints one `error: ...` line and exits with status 2 (the traceback only with
  `verbose`). `cleanup` runs on any failure (e.g. removing the empty folders the run created)."""
  try:
    return fn()
  except BaseException as e:
    if cleanup is not None:
      cleanup()
    if isinstance(e, USER_ERRORS) and not verbose:
      print(f"error: {e}\n(rerun with --verbose for the Python traceback)", file=sys.stderr, flush=True)
      sys.exit(2)
    if isinstance(e, USER_ERRORS):
      traceback.print_exc()
      sys.exit(2)
    raise


def describe_in_help(module) -> None:
  """Makes `--help` show `module`'s docstring and flags: absl shows those of the script that was run
  (`train.py`, the `ldae-train` console script), which only imports the module that defines them."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  sys.modules["__main__"].__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
