"""The 2.5D semantic encoder Enc_phi of LDAE (the reference's `AttentionSemanticEncoder`).

Input: a volume (B, X, Y, Z, 1) in the autoencoder's orientation. Each of the Z axial slices is an X x Y image
(128 x 160 at paper size) fed to a grayscale ConvNeXt; slice k gets position k. Then, per volume:
  features (B, Z, C) + fixed interleaved sin/cos table -> dropout
  -> soft-attention pooling (Linear C->1, softmax over slices, weighted sum) = the query
  -> separate Linear q/k/v projections
  -> multi-head attention with its *own* in-projections (q|k|v) and out_proj (the reference's
     `nn.MultiheadAttention` on top of the q/k/v Linears; both kept so its weights load unchanged)
  -> LayerNorm (eps 1e-5) -> y (B, emb_dim).
The backbone runs in `compute_dtype` (bf16 on accelerators), optionally rematerialised per ConvNeXt block:
at paper size one volume is 128 images of 128 x 160. The heads run in float32 (softmaxes included).

Randomness (train mode): stochastic depth in the backbone, dropout after the positional table and on the
attention weights (both `config.encoder.attn_dropout`, 0.1 as in the reference). `rngs=None` with
`deterministic=False` draws from the module's own `nnx.Rngs` stream `dropout`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ldae_jax.models.convnext import ConvNeXt
from ldae_jax.models.init import dtype_from_name, torch_bias_init, torch_kernel_init

CODE_NORMS = ("none", "template")
# Far below the across-scan variance of even an untrained encoder's code (~1e-4 per dimension): a larger eps
# would put a floor under the normalised code's scale that a collapsing encoder could hide beneath.
CODE_NORM_EPS = 1e-10


def positional_table(length: int, dim: int) -> np.ndarray:
  """(length, dim) float32: pe[k, 2i] = sin(k w_i), pe[k, 2i+1] = cos(k w_i), w_i = 10000^(-2i/dim).

  Computed in float32 like the reference buffer (same rounding of the frequencies).
  """
  if dim % 2:
    raise ValueError(f"config.encoder.emb_dim={dim} must be even for the sin/cos positional table.")
  pos = np.arange(length, dtype=np.float32)[:, None]
  freq = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
  pe = np.zeros((length, dim), np.float32)
  pe[:, 0::2] = np.sin(pos * freq)
  pe[:, 1::2] = np.cos(pos * freq)
  return pe


def _linear(i: int, o: int, rngs: nnx.Rngs) -> nnx.Linear:
  """PyTorch-default Linear init (U(+-1/sqrt(fan_in)) weights and biases), float32."""
  return nnx.Linear(i, o, kernel_init=torch_kernel_init, bias_init=torch_bias_init(i), param_dtype=jnp.float32,
                    dtype=jnp.float32, rngs=rngs)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class SoftAttention(nnx.Module):
  """score_k = Linear(x_k); a = softmax_k(score); pooled = sum_k a_k x_k. `.linear` mirrors `soft_attention.linear`."""

  def __init__(self, dim: int, rngs: nnx.Rngs):
    self.linear = _linear(dim, 1, rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    weights = jax.nn.softmax(self.linear(x)[..., 0].astype(jnp.float32), axis=-1)  # (B, L)
    return jnp.einsum("bl,blc->bc", weights, x), weights


class MultiheadAttention(nnx.Module):
  """torch `nn.MultiheadAttention` (batch_first): packed in-projection (rows q|k|v), scaled softmax, out_proj.

  `in_proj_kernel` is the transpose of torch's `in_proj_weight` (E, 3E): columns [0:E] are q, [E:2E] k, [2E:3E] v.
  """

  def __init__(self, dim: int, num_heads: int, dropout: float, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"config.encoder.emb_dim={dim} is not divisible by config.encoder.num_heads={num_heads}.")
    self.num_heads = num_heads
    self.dropout = dropout
    bound = math.sqrt(6.0 / (dim + 3 * dim))  # torch: xavier_uniform_ on the (3E, E) weight, zero bias
    self.in_proj_kernel = nnx.Param(jax.random.uniform(rngs.params(), (dim, 3 * dim), jnp.float32, -bound, bound))
    self.in_proj_bias = nnx.Param(jnp.zeros((3 * dim,), jnp.float32))
    self.out_proj = nnx.Linear(dim, dim, kernel_init=torch_kernel_init, bias_init=nnx.initializers.zeros_init(),
                               param_dtype=jnp.float32, dtype=jnp.float32, rngs=rngs)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, key: jax.Array | None = None) -> jax.Array:
    e = q.shape[-1]
    w, b = self.in_proj_kernel[...], self.in_proj_bias[...]
    q = q @ w[:, :e] + b[:e]
    k = k @ w[:, e:2 * e] + b[e:2 * e]
    v = v @ w[:, 2 * e:] + b[2 * e:]
    h, hd = self.num_heads, e // self.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(hd)
    attn = _dropout(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), self.dropout, key)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, split(v)).reshape(q.shape)
    return self.out_proj(out)


class CodeNorm(nnx.Module):
  """The code relative to the template's code, each dimension standardised across the batch (running
  statistics when deterministic).

  A randomly initialised encoder's code of near-identical registered brains is ~98 % the same vector for every
  scan, and that common part moves with every optimizer step far more than the codes differ between scans:
  statistics averaged over past steps would then be offset by more than the signal. The template's code,
  computed with the same weights in the same pass, removes the common part exactly; what is left varies on
  the scale of the between-scan differences, and lagging statistics only scale it slightly.

  The running mean and variance are exponential averages with bias correction (as Adam's moments): they start
  at zero weight instead of a (0, 1) prior, so a short run's deterministic codes are standardised by the data
  and not by an initial guess that a few hundred steps of momentum 0.99 would not forget. Training calls
  `update` explicitly (stage 3 does it with the EMA encoder's codes, the ones evaluation standardises).
  """

  def __init__(self, dim: int, momentum: float, template_shape: tuple[int, ...]):
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"config.encoder.code_norm_momentum={momentum} must be in [0, 1).")
    self.momentum = momentum
    # The train split's mean image (X, Y, Z, C), set by stage 3 (`set_template`); its code is subtracted from
    # every code in the same forward pass.
    self.template = nnx.BatchStat(jnp.zeros(template_shape, jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.weight = nnx.BatchStat(jnp.zeros((), jnp.float32))  # 1 - momentum**updates: the bias correction

  @staticmethod
  def batch_statistics(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(y, axis=0)
    return mean, jnp.mean(jnp.square(y - mean), axis=0)

  def update(self, y: jax.Array) -> None:
    """Moves the running statistics towards the batch statistics of `y` (B, D)."""
    mean, var = self.batch_statistics(y.astype(jnp.float32))
    m = self.momentum
    self.mean[...] = m * self.mean[...] + (1 - m) * mean
    self.var[...] = m * self.var[...] + (1 - m) * var
    self.weight[...] = m * self.weight[...] + (1 - m)

  def __call__(self, y: jax.Array, *, use_running_average: bool) -> jax.Array:
    """Standardised `y`: by the running statistics, or by the batch's own (which leaves them unchanged)."""
    y = y.astype(jnp.float32)
    if use_running_average:  # before any update (an untrained encoder): the relative code as it is
      w = self.weight[...]
      safe = jnp.where(w > 0, w, 1.0)
      mean = jnp.where(w > 0, self.mean[...] / safe, 0.0)
      var = jnp.where(w > 0, self.var[...] / safe, 1.0)
    else:
      mean, var = self.batch_statistics(y)
    return (y - mean) * jax.lax.rsqrt(var + CODE_NORM_EPS)


class SemanticEncoder(nnx.Module):
  """(B, X, Y, Z, 1) volume -> y_sem (B, emb_dim). Attribute names mirror the PyTorch module."""

  def __init__(self, *, dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), stochastic_depth: float = 0.4,
               emb_dim: int = 768, num_heads: int = 8, seq_len: int = 128, attn_dropout: float = 0.1,
               in_channels: int = 1, patch_size: int = 4, code_norm: str = "none",
               code_norm_momentum: float = 0.999, template_shape: tuple[int, ...] | None = None,
               dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
    if dims[-1] != emb_dim:
      raise ValueError(f"config.encoder.dims[-1]={dims[-1]} must equal config.encoder.emb_dim={emb_dim}: the "
                       "reference adds an emb_dim-wide positional table to the backbone features.")
    self.in_channels = in_channels
    self.seq_len = seq_len
    self.emb_dim = emb_dim
    self.attn_dropout = attn_dropout
    self.backbone = ConvNeXt(in_channels=in_channels, dims=dims, depths=depths,
                             stochastic_depth_prob=stochastic_depth, patch_size=patch_size, dtype=dtype,
                             remat=remat, rngs=rngs)
    self.query_projection = _linear(emb_dim, emb_dim, rngs)
    self.key_projection = _linear(emb_dim, emb_dim, rngs)
    self.value_projection = _linear(emb_dim, emb_dim, rngs)
    self.soft_attention = SoftAttention(emb_dim, rngs)
    self.cross_attention = MultiheadAttention(emb_dim, num_heads, attn_dropout, rngs)
    self.layer_norm_after_attention = nnx.LayerNorm(emb_dim, epsilon=1e-5, use_fast_variance=False,
                                                    param_dtype=jnp.float32, dtype=jnp.float32, rngs=rngs)
    if code_norm not in CODE_NORMS:
      raise ValueError(f"config.encoder.code_norm={code_norm!r}: one of {CODE_NORMS}.")
    # "template": the code relative to the train split's mean image, standardised (CodeNorm); "none": the
    # reference's LayerNorm'd code.
    self.code_norm = nnx.data(None)
    if code_norm == "template":
      if template_shape is None:
        raise ValueError("code_norm='template' needs template_shape (the (X, Y, Z, C) of the input volumes).")
      self.code_norm = CodeNorm(emb_dim, code_norm_momentum, tuple(template_shape))
    self.rngs = nnx.Rngs(dropout=rngs.dropout())

  def _check(self, volume: jax.Array) -> None:
    if volume.ndim != 5 or volume.shape[-1] != self.in_channels:
      raise ValueError(f"SemanticEncoder expects a (B, X, Y, Z, {self.in_channels}) volume (the autoencoder's "
                       f"orientation), got {volume.shape}.")
    if volume.shape[3] > self.seq_len:
      raise ValueError(f"SemanticEncoder: {volume.shape[3]} axial slices exceed config.encoder.seq_len="
                       f"{self.seq_len} (the positional table's length).")

  def slice_features(self, volume: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """(B, X, Y, Z, C) -> (B, Z, emb_dim) float32: the backbone on every axial slice (Z first, X x Y images)."""
    self._check(volume)
    b, x, y, z, c = volume.shape
    images = jnp.transpose(volume, (0, 3, 1, 2, 4)).reshape(b * z, x, y, c)
    return self.backbone(images, key=key).reshape(b, z, -1)

  def _layer_norm_code(self, volume: jax.Array, keys) -> tuple[jax.Array, dict]:
    feats = self.slice_features(volume, key=keys[0])
    seq = feats + jnp.asarray(positional_table(self.seq_len, self.emb_dim)[: feats.shape[1]])
    seq = _dropout(seq, self.attn_dropout, keys[1])
    pooled, weights = self.soft_attention(seq)
    q = self.query_projection(pooled[:, None, :])
    k = self.key_projection(seq)
    v = self.value_projection(seq)
    attn_out = self.cross_attention(q, k, v, keys[2])
    inter = dict(slice_features=feats, after_positional_encoding=seq, soft_attention_weights=weights,
                 soft_attention_pooled=pooled, q_proj=q, k_proj=k, v_proj=v, cross_attention_out=attn_out)
    return self.layer_norm_after_attention(attn_out)[:, 0, :], inter

  def forward_with_intermediates(self, volume: jax.Array, *, deterministic: bool = True,
                                 rngs: nnx.Rngs | jax.Array | None = None) -> tuple[jax.Array, dict]:
    """y and every intermediate the reference fixture stores (slice_features, soft_attention_weights, ...)."""
    keys = [None] * 3
    if not deterministic:
      if rngs is None:
        rngs = self.rngs
      key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
      keys = list(jax.random.split(key, 3))
    y, inter = self._layer_norm_code(volume, keys)
    if self.code_norm is not None:  # the template's code: same weights, no dropout
      y_template, _ = self._layer_norm_code(self.code_norm.template[...][None].astype(volume.dtype), [None] * 3)
      inter["relative_code"] = y - y_template
      y = self.code_norm(inter["relative_code"], use_running_average=deterministic)
    return y, inter

  def __call__(self, volume: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    return self.forward_with_intermediates(volume, deterministic=deterministic, rngs=rngs)[0]

  def update_code_statistics(self, volume: jax.Array) -> None:
    """One update of the code norm's running statistics from the deterministic codes of `volume`."""
    if self.code_norm is None:
      return
    _, inter = self.forward_with_intermediates(volume, deterministic=True)
    self.code_norm.update(jax.lax.stop_gradient(inter["relative_code"]))

  def set_template(self, image: jax.Array) -> None:
    """The reference image whose code every code is taken relative to (the train split's mean image)."""
    if self.code_norm is None:
      raise ValueError("set_template needs config.encoder.code_norm='template'.")
    want = self.code_norm.template[...].shape
    if tuple(image.shape) != tuple(want):
      raise ValueError(f"template image of shape {tuple(image.shape)}, the encoder's inputs are {tuple(want)}.")
    self.code_norm.template[...] = jnp.asarray(image, jnp.float32)


def build_encoder(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SemanticEncoder:
  """SemanticEncoder from `config.encoder`, `config.compute_dtype` and `config.remat`."""
  e = config.encoder
  return SemanticEncoder(dims=tuple(e.dims), depths=tuple(e.depths), stochastic_depth=e.stochastic_depth,
                         emb_dim=e.emb_dim, num_heads=e.num_heads, seq_len=e.seq_len,
                         attn_dropout=e.attn_dropout, patch_size=e.patch_size, code_norm=e.code_norm,
                         code_norm_momentum=e.code_norm_momentum,
                         template_shape=tuple(config.data.image_shape) + (1,),
                         dtype=dtype_from_name(config.compute_dtype), remat=bool(config.remat), rngs=rngs)
