"""`python train.py --config configs/paper.py --config.stage=ldm` with tiny size overrides compiles and runs
a few steps on CPU, writes the stage outputs, and rejects bad config values naming the field."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from ldae_jax.data import shards

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.data.image_shape=(8,8,8)", "--config.encoder.seq_len=8", "--config.autoencoder.channels=(4,4)",
        "--config.autoencoder.norm_groups=2", "--config.unet.base_channels=4", "--config.unet.channel_mult=(1,)",
        "--config.unet.num_res_blocks=1", "--config.unet.attention_resolutions=()", "--config.unet.norm_groups=2",
        "--config.train.ldm.batch_size=2", "--config.train.ldm.steps=3", "--config.train.ldm.log_every=1",
        "--config.train.ldm.checkpoint_every=2"]


def _train(workdir: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "ldae_jax_test_jaxcache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/paper.py"),
                         f"--workdir={workdir}", "--config.stage=ldm", *TINY, *extra],
                        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_paper_config_ldm_stage_runs_tiny(tmp_path):
  rng = np.random.default_rng(0)
  with shards.ShardWriter(tmp_path / "latents" / "shards" / "train", metadata={"scale_factor": 1.1}) as w:
    for i in range(4):
      w.write(dict(mu=rng.normal(size=(4, 4, 4, 3)).astype(np.float32),
                   logvar=np.zeros((4, 4, 4, 3), np.float32), subject=f"s{i}", scan_id=f"s{i}"))
  cache = tmp_path / "jax_cache"
  out = _train(tmp_path, "--config.profile_steps=1", f"--config.compilation_cache_dir={cache}")
  assert out.returncode == 0, out.stderr[-4000:]
  assert "[ldm] done: 3 steps" in out.stdout
  # One traced step after the first (compile and warm-up stay out); the compiled programs land in the cache.
  assert "profiler trace of steps 2-2" in out.stdout
  assert list((tmp_path / "ldm" / "profile" / "process_0").glob("plugins/profile/*/*.xplane.pb"))
  assert any(cache.iterdir())
  # The package's INFO lines show by default (libraries' do not); a non-terminal gets plain progress lines.
  assert "compiled ldm step in" in out.stderr and "saving checkpoint 3 to" in out.stderr
  assert "\r" not in out.stderr and "[ldm] step 2/3: loss" in out.stdout
  stage = tmp_path / "ldm"
  summary = json.loads((stage / "summary.json").read_text())
  assert summary["steps"] == 3 and np.isfinite(summary["final_loss"]) and summary["compile_seconds"] > 0
  lines = [json.loads(l) for l in (stage / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert sorted(p.name for p in (stage / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_bad_stage_and_unknown_field_are_rejected(tmp_path):
  out = _train(tmp_path, "--config.stage=ldmm")
  assert out.returncode != 0 and "config.stage='ldmm'" in out.stderr
  out = _train(tmp_path, "--config.unet.base_chanels=8")
  assert out.returncode != 0 and "base_chanels" in out.stderr


def test_user_errors_are_one_line_without_traceback_and_leave_no_folders(tmp_path):
  wd = tmp_path / "run"
  bad_value = _train(wd, "--config.train.ldm.steps=-5")
  bad_manifest = _train(wd, "--config.data.manifest=" + str(tmp_path / "nowhere.csv"), "--config.stage=autoencoder")
  no_weights = _train(wd, "--config.stage=latents")  # no autoencoder checkpoint in the workdir
  for out, says in [(bad_value, "config.train.ldm.steps=-5"), (bad_manifest, "nowhere.csv"),
                    (no_weights, "run the autoencoder stage first")]:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: " in out.stderr and says in out.stderr and "--verbose" in out.stderr
  assert not wd.exists()  # the failed latents run made its folders and removed them again
  verbose = _train(wd, "--config.train.ldm.steps=-5", "--verbose")
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_only_process_0_prints(monkeypatch, capsys):
  """Stage and progress lines go to stdout on process 0 only; other processes keep stderr for their errors."""
  import jax  # pylint: disable=import-outside-toplevel
  from ldae_jax.cli import common  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  common.print_on_first_process_only()
  print("from process 0")
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  common.print_on_first_process_only()
  print("from process 1")
  print("error on process 1", file=sys.stderr)
  out = capsys.readouterr()
  assert out.out == "from process 0\n" and out.err == "error on process 1\n"
