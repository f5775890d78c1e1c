"""Key maps against the paper state-dict listings, the conversion CLI round trip and its error messages."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldae_jax.convert import common
from ldae_jax.convert import shift_unet as convert_shift
from ldae_jax.convert import unet as convert_unet
from ldae_jax.config import load_config
from ldae_jax.convert.__main__ import build_abstract, load_converted, main
from ldae_jax.models.layers import materialize_rng_state

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = '''
from ldae_jax.config import default_config
def get_config(variant=""):
  c = default_config()
  c.unet.base_channels = {base}
  c.unet.num_res_blocks = 1
  c.encoder.emb_dim = 16
  return c
'''


@pytest.mark.parametrize("network,listing,conv", [("unet", "unet_paper.txt", convert_unet),
                                                  ("shift_unet", "shift_unet_paper.txt", convert_shift)])
def test_paper_listing_maps_completely(paper_listing, network, listing, conv):
  sd = paper_listing(listing)
  model = build_abstract(network, load_config(str(REPO / "configs" / "paper.py")))
  shapes = common.flat_param_shapes(model)
  flat, report = common.convert_state_dict(sd, shapes, conv.key_map, source=listing)
  assert report.consumed == len(sd) == len(shapes) and report.duplicates_skipped == 0
  expected = {"unet": 486_927_363, "shift_unet": 865_339_142}[network]
  assert sum(int(np.prod(s)) for s in shapes.values()) == expected


def test_key_map_and_prefixes():
  assert convert_unet.key_map("input_blocks.0.0.weight") == (("input_blocks", 0, 0, "kernel"), "conv")
  assert convert_unet.key_map("middle_block.1.qkv.weight") == (("middle_block", 1, "qkv", "kernel"), "conv1x1")
  assert convert_unet.key_map("output_blocks.2.0.out_layers.0.weight") == (
      ("output_blocks", 2, 0, "out_layers_0", "scale"), "identity")
  assert convert_unet.key_map("label_emb.weight") is None and convert_unet.key_map("vae.x.weight") is None
  assert convert_shift.key_map("out.2.bias") == (("unet", "out_2", "bias"), "identity")
  assert convert_shift.key_map("shift_output_blocks.5.0.emb_z_layers.1.weight") == (
      ("shift_output_blocks", 5, 0, "emb_z_layers_1", "kernel"), "linear")
  lightning = {"unet.time_embed.0.weight": 0, "ema_unet.time_embed.0.weight": 0}
  assert convert_unet.detect_prefix(lightning) == "ema_unet."
  with pytest.raises(common.ConversionError, match="--prefix"):
    convert_unet.detect_prefix({"encoder.x": 0})


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
  d = tmp_path_factory.mktemp("cfg")
  (d / "tiny.py").write_text(TINY_CONFIG.format(base=32))
  (d / "wide.py").write_text(TINY_CONFIG.format(base=64))
  return d


def test_cli_round_trip_reproduces_outputs(refdir, tiny_cfg, tmp_path, load_fixture, capsys):
  out = tmp_path / "unet_ckpt"
  rc = main(["--network", "unet", "--config", str(tiny_cfg / "tiny.py"), "--input",
             str(refdir / "unet_tiny.npz"), "--output", str(out)])
  assert rc == 0 and "218 tensors converted" in capsys.readouterr().out
  model = build_abstract("unet", load_config(str(tiny_cfg / "tiny.py")))
  load_converted(str(out), model)
  materialize_rng_state(model)
  fx = load_fixture("unet_tiny")
  eps = nnx.jit(lambda m, x, t: m(x, t))(model, jnp.asarray(fx["in/x"].transpose(0, 2, 3, 4, 1)),
                                         jnp.asarray(fx["in/t"]))
  np.testing.assert_allclose(np.asarray(eps).transpose(0, 4, 1, 2, 3), fx["out/eps"], rtol=1e-4, atol=5e-5)
  # Existing output is not overwritten silently.
  assert main(["--network", "unet", "--config", str(tiny_cfg / "tiny.py"), "--input",
               str(refdir / "unet_tiny.npz"), "--output", str(out)]) == 2
  assert "--force" in capsys.readouterr().err
  # A model of another config: every differing shape is named.
  wide = build_abstract("unet", load_config(str(tiny_cfg / "wide.py")))
  with pytest.raises(common.ConversionError, match=r"input_blocks/0/0/kernel: checkpoint \(3, 3, 3, 3, 32\)"):
    load_converted(str(out), wide)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_converted(str(tmp_path / "nowhere"), wide)


def test_cli_errors_are_clear(refdir, tiny_cfg, tmp_path, capsys):
  bad = tmp_path / "corrupt.npz"
  bad.write_bytes(b"not a zip file")
  args = ["--network", "unet", "--config", str(tiny_cfg / "tiny.py"), "--output", str(tmp_path / "o")]
  assert main(args + ["--input", str(bad)]) == 2
  assert "not a readable .npz" in capsys.readouterr().err
  assert main(args + ["--input", str(tmp_path / "missing.pth")]) == 2
  assert "missing.pth" in capsys.readouterr().err
  # The tiny checkpoint against a wider config: shape mismatches listed, nothing written.
  wide = ["--network", "unet", "--config", str(tiny_cfg / "wide.py"), "--output", str(tmp_path / "o")]
  assert main(wide + ["--input", str(refdir / "unet_tiny.npz")]) == 2
  err = capsys.readouterr().err
  assert "shape mismatches" in err and "input_blocks.0.0.weight" in err
  # A UNet checkpoint given as a ShiftUNet: no label_emb under any known prefix.
  assert main(["--network", "shift_unet", "--config", str(tiny_cfg / "tiny.py"), "--output",
               str(tmp_path / "o"), "--input", str(refdir / "unet_tiny.npz")]) == 2
  assert "label_emb.weight" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


def test_cli_finds_shift_unet_under_lightning_ema_decoder(load_fixture, tiny_cfg, tmp_path, capsys):
  """A stage-3 Lightning checkpoint holds the ShiftUNet as `ema_decoder.` (and `decoder.`) beside the encoder:
  the CLI converts the EMA copy without --prefix."""
  params = {k[len("param/"):]: v for k, v in load_fixture("shift_unet_tiny").items() if k.startswith("param/")}
  ckpt = {f"ema_decoder.{k}": v for k, v in params.items()}
  ckpt |= {f"decoder.{k}": v + 1.0 for k, v in params.items()}  # the raw weights differ from the EMA ones
  ckpt |= {"ema_encoder.query_projection.weight": np.zeros((16, 16), np.float32)}
  np.savez(tmp_path / "stage3.npz", **ckpt)
  out = tmp_path / "shift_ckpt"
  assert main(["--network", "shift_unet", "--config", str(tiny_cfg / "tiny.py"), "--input",
               str(tmp_path / "stage3.npz"), "--output", str(out)]) == 0
  assert f"{len(params)} tensors converted" in capsys.readouterr().out
  model = build_abstract("shift_unet", load_config(str(tiny_cfg / "tiny.py")))
  load_converted(str(out), model)
  np.testing.assert_array_equal(np.asarray(model.label_emb.kernel[...]), params["label_emb.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.unet.out_2.bias[...]), params["out.2.bias"])
