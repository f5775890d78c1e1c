"""The CPU depth-tap convolution equals XLA's 3D convolution (values and gradients) for every layout used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldae_jax.models import conv

DN = ("NDHWC", "DHWIO", "NDHWC")


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
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  g_ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(ours(x, w))), argnums=(0, 1))(x, w)
  g_xla = jax.grad(lambda x, w: jnp.sum(jnp.sin(xla(x, w))), argnums=(0, 1))(x, w)
  for a, b in zip(g_ours, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


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
