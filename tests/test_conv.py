"""The CPU convolution paths equal XLA's (values and gradients) for every layout used: depth taps for 3D,
shifted products for stride-1 depthwise 2D (the ConvNeXt block)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldae_jax.models import conv

DN = ("NDHWC", "DHWIO", "NDHWC")


def assert_same_values_and_gradients(ours, xla, x, w):
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1))(x, w)
  g_xla = jax.grad(lambda x, w: jnp.sum(jnp.sin(xla(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,kernel,strides,padding,groups", [
    ((2, 6, 8, 10, 3), (3, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1)), 1),   # UNet / AE 'same' conv
    ((1, 7, 9, 8, 4), (3, 3, 3), (2, 2, 2), ((0, 1), (0, 1), (0, 1)), 1),   # AE downsample (pad end, stride 2)
    ((1, 9, 8, 10, 2), (4, 4, 4), (2, 2, 2), ((1, 1), (1, 1), (1, 1)), 1),  # discriminator k4 s2 p1
    ((1, 5, 6, 7, 4), (4, 4, 4), (1, 1, 1), ((1, 1), (1, 1), (1, 1)), 2),   # stride 1, grouped
    ((2, 4, 6, 6, 3), (3, 3, 3), (1, 1, 1), "SAME", 1),
    ((2, 5, 6, 6, 3), (2, 3, 1), (1, 2, 1), "VALID", 1),
    ((2, 6, 4, 4, 6), (3, 3, 3), (2, 1, 1), ((1, 1), (1, 1), (1, 1)), 3),   # groups with depth stride
    ((1, 4, 5, 4, 6), (3, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1)), 6),   # depthwise
])
def test_depth_taps_equal_xla_conv3d(shape, kernel, strides, padding, groups):
  assert jax.default_backend() == "cpu"
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape, jnp.float32)
  w = jax.random.normal(kw, kernel + (shape[-1] // groups, 6), jnp.float32)

  def ours(x, w):
    return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN, feature_group_count=groups)

  assert conv._use_depth_taps(x, w, strides, None, None, DN)  # the CPU path is the one under test
  assert_same_values_and_gradients(ours, xla, x, w)


def test_other_layouts_fall_through_to_xla():
  x = jnp.ones((1, 4, 4, 4, 2))
  w = jnp.ones((1, 1, 1, 2, 3))  # a 1x1x1 kernel has a single depth tap: nothing to gain
  assert not conv._use_depth_taps(x, w, (1, 1, 1), None, None, DN)
  x2 = jnp.ones((1, 8, 8, 2))
  assert not conv._use_depth_taps(x2, jnp.ones((3, 3, 2, 2)), (1, 1), None, None, ("NHWC", "HWIO", "NHWC"))
  assert not conv._use_depth_taps(x, jnp.ones((3, 3, 3, 2, 3)), (1, 1, 1), None, (2, 2, 2), DN)


def test_every_size_takes_the_depth_fold():
  w = jnp.ones((3, 3, 3, 8, 8))
  assert conv._use_depth_taps(jnp.ones((1, 2, 3, 3, 8)), w, (1, 1, 1), None, None, DN)  # tiny test UNet
  assert conv._use_depth_taps(jnp.ones((4, 32, 40, 32, 8)), w, (1, 1, 1), None, None, DN)  # quickstart AE


@pytest.mark.parametrize("r", [1, 2, 3, 4])
@pytest.mark.parametrize("shape,kernel,padding,hw_strides", [
    ((2, 7, 6, 5, 3), (3, 3, 3), ((1, 1), (1, 1), (1, 1)), (1, 1)),  # 7 output depths: a ragged last block
    ((1, 8, 6, 6, 2), (3, 3, 3), ((1, 1), (1, 1), (1, 1)), (2, 2)),  # strided in H and W
    ((1, 6, 4, 4, 2), (3, 3, 3), ((0, 0), (0, 0), (0, 0)), (1, 1)),  # VALID: 4 output depths
    ((1, 5, 4, 4, 2), (1, 1, 1), ((0, 0), (0, 0), (0, 0)), (1, 1)),
])
def test_depth_blocks_equal_xla_conv3d(r, shape, kernel, padding, hw_strides):
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, shape, jnp.float32)
  w = jax.random.normal(kw, kernel + (shape[-1], 5), jnp.float32)
  ours = lambda x, w: conv.depth_blocked_conv(x, w, padding, r, hw_strides)
  xla = lambda x, w: jax.lax.conv_general_dilated(x, w, (1,) + hw_strides, padding, dimension_numbers=DN)
  assert_same_values_and_gradients(ours, xla, x, w)


def test_depth_blocks_go_where_they_were_measured_to_pay():
  assert conv.depth_block(1, 8, (32, 40, 32)) == 4   # the AE's input convolution
  assert conv.depth_block(8, 1, (32, 40, 32)) == 4   # ... and its output convolution
  assert conv.depth_block(8, 8, (32, 40, 32)) == 2
  assert conv.depth_block(16, 16, (32, 40, 32)) == 2
  assert conv.depth_block(16, 16, (16, 20, 16)) == 1
  assert conv.depth_block(64, 64, (8, 5, 4)) == 1    # the UNet's widths keep the plain fold


DN2 = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 8, 10, 4), 7, ((3, 3), (3, 3))),   # the ConvNeXt block's 7x7 at the quickstart's first stage
    ((2, 2, 2, 5), 7, ((3, 3), (3, 3))),    # a map smaller than the kernel: only the live taps
    ((2, 1, 1, 6), 7, ((3, 3), (3, 3))),    # 1x1: the centre tap alone
    ((2, 5, 6, 3), 3, "SAME"),
    ((2, 6, 5, 2), 4, ((1, 2), (0, 3))),    # uneven, one-sided padding
    ((1, 5, 4, 3), 3, "VALID"),
])
def test_depthwise_taps_equal_xla_conv2d(shape, kernel, padding):
  c = shape[-1]
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, shape, jnp.float32)
  w = jax.random.normal(kw, (kernel, kernel, 1, c), jnp.float32)

  def ours(x, w):
    return conv.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN2, feature_group_count=c)

  def xla(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN2, feature_group_count=c)

  assert conv._depthwise_pads(x, w, (1, 1), padding, None, None, DN2, c) is not None  # the path under test
  ref = xla(x, w)
  np.testing.assert_allclose(ours(x, w), ref, rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(kg, ref.shape, jnp.float32)
  g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w)) * ct), argnums=(0, 1))(x, w)
  g_xla = jax.grad(lambda x, w: jnp.sum(jnp.sin(xla(x, w)) * ct), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_live_taps_skip_only_windows_over_padding():
  assert conv._live_taps(1, 3, 1, 7) == [3]                 # 1 pixel, pad 3: the centre
  assert conv._live_taps(2, 3, 2, 7) == [2, 3, 4]
  assert conv._live_taps(8, 3, 8, 7) == list(range(7))      # every tap sees a real pixel


def test_other_2d_convolutions_fall_through_to_xla():
  x = jnp.ones((1, 8, 8, 4))
  dw = jnp.ones((7, 7, 1, 4))
  pads = ((3, 3), (3, 3))
  assert conv._depthwise_pads(x, dw, (2, 2), pads, None, None, DN2, 4) is None                 # strided
  assert conv._depthwise_pads(x, dw, (1, 1), pads, None, (2, 2), DN2, 4) is None               # dilated
  assert conv._depthwise_pads(x, jnp.ones((7, 7, 2, 4)), (1, 1), pads, None, None, DN2, 2) is None  # grouped
  assert conv._depthwise_pads(x, jnp.ones((4, 4, 4, 8)), (4, 4), "VALID", None, None, DN2, 1) is None  # stem
  assert conv._depthwise_pads(x, dw, (1, 1), ((7, 0), (3, 3)), None, None, DN2, 4) is None     # pad > k - 1
  # and the dispatch then equals XLA's (the ConvNeXt stem: 4x4 stride 4)
  w = jax.random.normal(jax.random.key(0), (4, 4, 4, 8))
  np.testing.assert_allclose(conv.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=DN2),
                             jax.lax.conv_general_dilated(x, w, (4, 4), "VALID", dimension_numbers=DN2), rtol=1e-6)
