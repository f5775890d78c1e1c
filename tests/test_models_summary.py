"""`python -m ldae_jax.models`: exact paper parameter counts through nnx.eval_shape (no allocation)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from ldae_jax.config import load_config
from ldae_jax.models import __main__ as summary_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
# the reference's counts (param_counts.json of the reference test vectors)
PAPER = {"AutoencoderKL": 13_766_248, "PatchDiscriminator": 11_048_769, "UNet": 486_927_363,
         "ShiftUNet": 865_339_142, "SemanticEncoder": 53_588_065}


@pytest.fixture(scope="module")
def table():
  return summary_cli.summary(load_config(str(REPO / "configs" / "paper.py")))


@pytest.mark.parametrize("label,builder,module", summary_cli.NETWORKS)
def test_paper_counts_exact(table, label, builder, module):
  if importlib.util.find_spec(f"ldae_jax.models.{module}") is None:
    pytest.skip(f"ldae_jax.models.{module} does not exist yet ({builder} missing)")
  assert table[label]["params"] == PAPER[label]
  if label == "ShiftUNet":
    assert table[label]["trainable"] == 378_411_779


def test_cli_prints_every_network(table, capsys, monkeypatch):
  monkeypatch.setattr(summary_cli, "summary", lambda config: table)  # counted once, in the fixture
  assert summary_cli.main(["--config", str(REPO / "configs" / "paper.py")]) == 0
  out = capsys.readouterr().out
  assert "486,927,363" in out and "trainable (shift branch) 378,411,779" in out
  for label in PAPER:
    assert label in out
