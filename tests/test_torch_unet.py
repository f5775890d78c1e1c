"""benchmarks/torch_unet.py (the PyTorch UNet the CPU benchmark times) is the reference network: strict
state-dict load of the reference `unet_tiny` fixture, its outputs, and agreement with the project's UNet."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a benchmark-only extra (pip install torch)")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import torch_unet  # noqa: E402  pylint: disable=g-import-not-at-top


def test_loads_the_reference_state_dict_and_reproduces_its_outputs(load_fixture):
  fx = load_fixture("unet_tiny")
  net = torch_unet.UNet(3, 32, (1, 2, 3), 1, (2, 4), groups=32).eval()
  sd = {k[len("param/"):]: torch.from_numpy(np.asarray(v)) for k, v in fx.items() if k.startswith("param/")}
  net.load_state_dict(sd, strict=True)  # same keys and shapes as the reference, none missing or extra
  with torch.no_grad():
    eps = net(torch.from_numpy(fx["in/x"]), torch.from_numpy(fx["in/t"])).numpy()
  np.testing.assert_allclose(eps, fx["out/eps"], rtol=1e-4, atol=5e-5)


def test_matches_the_project_unet_on_the_quickstart_layout():
  from ldae_jax import config as cfglib  # pylint: disable=g-import-not-at-top
  config = cfglib.load_config(str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"))
  config.unet.base_channels = 16  # small and quick; the layout (levels, attention, groups of 8) is the quickstart's
  assert torch_unet.check_against_project(config) < 1e-5
