"""Throughput harness: AOT compile, timing, FLOP accounting and the LDAE/DAE ratio, on micro networks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from configs import dae_image_space
from ldae_jax.evaluation import throughput
from tests.test_evaluation import micro_config


def test_peak_table_and_cpu_memory():
  class Dev:
    device_kind = "NVIDIA H100 80GB HBM3"
  assert throughput.device_peak_tflops(Dev()) == (989.0, "table (H100 bf16 dense)")
  assert throughput.device_peak_tflops(Dev(), 500.0)[0] == 500.0
  cpu = jax.devices("cpu")[0]
  assert throughput.device_peak_tflops(cpu)[0] is None  # no MFU on CPU
  assert throughput.peak_memory_bytes(cpu) is None


def test_measure_matmul_flops_and_rate():
  a = jnp.ones((64, 64), jnp.float32)
  w = throughput.Workload("mm", lambda x: x @ x, (a,), samples=4, model_flops="xla")
  r = throughput.measure(w, repeats=2, peak_tflops=1.0)
  assert r["model_flops_per_call"] == pytest.approx(2 * 64**3, rel=0.01)  # XLA counts 2 FLOP per MAC
  assert r["samples_per_s"] == pytest.approx(4 / r["seconds_per_call"])
  assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 1.0)


def test_ldae_and_dae_ddim_side_by_side():
  c = micro_config()
  d = dae_image_space.get_config("small")
  d.unet.base_channels, d.unet.channel_mult, d.unet.norm_groups, d.unet.attention_resolutions = 4, (1, 2), 4, ()
  ws = (throughput.ddim_workloads(c, label="ldae", spatial=(8, 10, 8), channels=3, batch=1, steps=2, emb_dim=16)
        + throughput.ddim_workloads(d, label="dae", spatial=(16, 20, 16), channels=1, batch=1, steps=2,
                                    emb_dim=16))
  assert [w.name for w in ws] == ["ldae_ddim2_encode", "ldae_ddim2_sample", "dae_ddim2_encode", "dae_ddim2_sample"]
  for w in ws:  # model FLOPs = steps x one network call
    assert w.model_flops == pytest.approx(2 * w.info["flops_per_network_call"])
  r = [throughput.measure(w, repeats=1) for w in (ws[1], ws[3])]
  assert all(x["samples_per_s"] > 0 and x["compile_s"] > 0 and x["mfu"] is None for x in r)
  assert r[1]["input_shape"] == [1, 16, 20, 16, 1] and r[0]["input_shape"] == [1, 8, 10, 8, 3]
  # Voxel space costs more model FLOPs per sample than latent space, even with a narrower UNet.
  assert r[1]["model_flops_per_call"] > r[0]["model_flops_per_call"]


def test_ddim_ratios_add_the_autoencoder_pass_to_ldae():
  r = {"ldae_ddim5_encode": {"seconds_per_call": 1.0}, "ldae_ddim5_sample": {"seconds_per_call": 2.0},
       "dae_ddim5_encode": {"seconds_per_call": 30.0}, "dae_ddim5_sample": {"seconds_per_call": 40.0},
       "ae_encode": {"seconds_per_call": 0.5}, "ae_decode": {"seconds_per_call": 2.0}}
  out = throughput.ddim_ratios(r, 5)
  assert out["encode"]["ddim_only"] == 30.0 and out["encode"]["with_autoencoder"] == 20.0  # 30 / (1 + 0.5)
  assert out["sample"]["ddim_only"] == 20.0 and out["sample"]["with_autoencoder"] == 10.0  # 40 / (2 + 2)
