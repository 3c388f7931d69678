"""Transformer building blocks shared by every model: norm, RoPE, attention, MLP, stack.

Parameters are created in `param_dtype` and carry logical axis names as metadata
(`logical_axes`); compute runs in `compute_dtype`; norms, softmax and logits run in fp32.
Attention masks are always "same segment id, and causal if asked", which covers every
model here: packed documents, packed word rows, and padding (segment 0 attends only to
padding, so no row is ever fully masked and nothing leaks into real positions).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hat.config import TransformerConfig
from hat.sharding import constrain, logical_to_spec

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
# What "auto" asks for on each backend; anything else (CPU, unknown) runs plain XLA.
_AUTO_IMPL = {"gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn", "tpu": "splash"}
_SPLASH_BLOCKS = (512, 256, 128)
log = logging.getLogger(__name__)
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: masked rows stay NaN-free


def to_dtype(name_or_dtype: Any) -> Any:
  """Config dtype name ('float32' | 'bfloat16') or dtype -> jnp dtype."""
  if isinstance(name_or_dtype, str):
    return DTYPES[name_or_dtype]
  return name_or_dtype


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], *,
          fan_in: int, dtype: Any) -> nnx.Param:
  """Normal weight with std 1/sqrt(fan_in), carrying logical axis metadata."""
  # Plain normal, not truncated: truncated_normal costs a slow compile per shape on CPU.
  value = jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5
  return nnx.Param(value.astype(dtype), logical_axes=axes)


def embed_lookup(table_VxD: jax.Array, ids_BxL: jax.Array, dtype: Any) -> jax.Array:
  """Rows of an embedding table, gathered with the width unsharded and batch-sharded out."""
  # Gathering from a width-sharded (fsdp) table into batch-sharded activations makes
  # GSPMD replicate the result; all-gathering the width first keeps it a plain gather.
  table_VxD = constrain(table_VxD, ("vocab", None))
  x_BxLxD = jnp.take(table_VxD, ids_BxL, axis=0).astype(dtype)
  return constrain(x_BxLxD, ("batch", "length", "embed"))


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in fp32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: Any = jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), to_dtype(param_dtype)), logical_axes=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (y * scale).astype(x.dtype)


def rope(x_BxLxHxK: jax.Array, pos_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half form) at explicit positions, since sequences are packed."""
  half = x_BxLxHxK.shape[-1] // 2
  freq_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xK = (pos_BxL.astype(jnp.float32)[:, :, None] * freq_K[None, None])[:, :, None]
  sin, cos = jnp.sin(angle_BxLx1xK), jnp.cos(angle_BxLx1xK)
  x = x_BxLxHxK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


def segment_mask(segment_BxL: jax.Array, causal: bool) -> jax.Array:
  """Boolean (B, L, L) mask: same segment id, and key <= query when causal."""
  mask_BxLxL = segment_BxL[:, :, None] == segment_BxL[:, None, :]
  if causal:
    length = segment_BxL.shape[1]
    mask_BxLxL = mask_BxLxL & jnp.tril(jnp.ones((length, length), jnp.bool_))[None]
  return mask_BxLxL


def attend(q_BxTxHxK: jax.Array, k_BxGxMxK: jax.Array, v_BxGxMxK: jax.Array,
           mask_BxTxM: jax.Array, *, bias_BxTxM: jax.Array | None = None,
           self_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Grouped-query attention math of T queries over M keys, fp32 softmax (train and cache).

  Keys/values are (B, G, M, K): kv heads before length, so the matmuls have leading
  batch dims (~25x faster than (B, M, G, K) for one query on CPU). `self_kv` =
  (k_BxTxGxK, v_BxTxGxK) adds each query's own key as one more, always visible, key: a
  KV cache that does not hold a position (hard deletion, a full cache) still lets that
  position attend to itself. A query with no visible key gets zero output.
  """
  batch, num_q, heads, head_dim = q_BxTxHxK.shape
  groups = k_BxGxMxK.shape[1]
  reps = heads // groups
  scale = head_dim**-0.5
  q_BxGxRxTxK = q_BxTxHxK.reshape(batch, num_q, groups, reps, head_dim).transpose(
      0, 2, 3, 1, 4)
  logits_BxGxRxTxM = jnp.einsum("bgrtk,bgmk->bgrtm", q_BxGxRxTxK, k_BxGxMxK,
                                preferred_element_type=jnp.float32) * scale
  if bias_BxTxM is not None:
    logits_BxGxRxTxM = logits_BxGxRxTxM + bias_BxTxM[:, None, None].astype(jnp.float32)
  mask_Bx1x1xTxM = mask_BxTxM[:, None, None]
  logits_BxGxRxTxM = jnp.where(mask_Bx1x1xTxM, logits_BxGxRxTxM, _MASK_VALUE)
  num_keys = logits_BxGxRxTxM.shape[-1]
  if self_kv is not None:
    k_self_BxTxGxK, v_self_BxTxGxK = self_kv
    self_BxGxRxTx1 = jnp.einsum("bgrtk,btgk->bgrt", q_BxGxRxTxK, k_self_BxTxGxK,
                                preferred_element_type=jnp.float32)[..., None] * scale
    logits_BxGxRxTxM = jnp.concatenate([logits_BxGxRxTxM, self_BxGxRxTx1], axis=-1)
  probs_BxGxRxTxM = jax.nn.softmax(logits_BxGxRxTxM, axis=-1)
  if self_kv is None:
    # A row with no visible key would average over everything: give it zero output.
    probs_BxGxRxTxM = jnp.where(mask_Bx1x1xTxM.any(-1, keepdims=True), probs_BxGxRxTxM, 0.0)
  out_BxGxRxTxK = jnp.einsum("bgrtm,bgmk->bgrtk",
                             probs_BxGxRxTxM[..., :num_keys].astype(v_BxGxMxK.dtype),
                             v_BxGxMxK)
  if self_kv is not None:
    out_BxGxRxTxK = out_BxGxRxTxK + jnp.einsum(
        "bgrt,btgk->bgrtk", probs_BxGxRxTxM[..., num_keys].astype(v_self_BxTxGxK.dtype),
        v_self_BxTxGxK)
  return out_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(batch, num_q, heads, head_dim)


def _xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL, bias_BxLxL=None):
  return attend(q_BxLxHxK, k_BxLxGxK.transpose(0, 2, 1, 3), v_BxLxGxK.transpose(0, 2, 1, 3),
                mask_BxLxL, bias_BxTxM=bias_BxLxL)


def _cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL, causal: bool,
                     bias_BxLxL=None):
  if q_BxLxHxK.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError("attention_impl='cudnn' needs compute_dtype='bfloat16', got "
                     f"{q_BxLxHxK.dtype}")
  # is_causal lets cuDNN skip the upper triangle; the mask adds the segment structure.
  out = jax.nn.dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                     mask=mask_BxLxL[:, None], is_causal=causal,
                                     bias=None if bias_BxLxL is None else
                                     bias_BxLxL[:, None].astype(q_BxLxHxK.dtype),
                                     implementation="cudnn")
  return jnp.where(mask_BxLxL.any(-1)[:, :, None, None], out, 0).astype(q_BxLxHxK.dtype)


def _splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_BxL, causal: bool,
                      interpret: bool = False):
  """TPU Pallas splash attention, one MQA kernel per kv group, segment ids for packing."""
  if jax.default_backend() != "tpu" and not interpret:
    raise NotImplementedError(
        f"attention_impl='splash' needs a TPU (backend is {jax.default_backend()!r}); "
        "use 'xla' on CPU or 'cudnn' on GPU")
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  batch, length, heads, head_dim = q_BxLxHxK.shape
  groups = k_BxLxGxK.shape[2]
  reps = heads // groups
  # The largest block dividing the length (select_attention_impl checked one does).
  block = next((b for b in _SPLASH_BLOCKS if b <= length and length % b == 0), length)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block,
                            block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  base = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
  kernel = splash.make_splash_mqa_single_device(
      splash.MultiHeadMask([base] * reps), block_sizes=sizes, interpret=interpret)
  # Kernel layout: heads before length; the kernel expects pre-scaled queries.
  q_BxGxRxLxK = (q_BxLxHxK * head_dim**-0.5).reshape(
      batch, length, groups, reps, head_dim).transpose(0, 2, 3, 1, 4)
  k_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
  v_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)

  def one(q_RxLxK, k_LxK, v_LxK, seg_L):
    return kernel(q_RxLxK, k_LxK, v_LxK, segment_ids=splash.SegmentIds(q=seg_L, kv=seg_L))

  per_group = jax.vmap(one, in_axes=(0, 0, 0, None))

  def run(q, k, v, seg):
    return jax.vmap(per_group)(q, k, v, seg)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    # Pallas calls are opaque to GSPMD: shard batch and kv groups by hand.
    spec5 = logical_to_spec(("batch", "kv_heads", None, None, None), mesh=mesh)
    spec4 = logical_to_spec(("batch", "kv_heads", None, None), mesh=mesh)
    spec2 = logical_to_spec(("batch", None), mesh=mesh)
    run = jax.shard_map(run, in_specs=(spec5, spec4, spec4, spec2), out_specs=spec5,
                        check_vma=False)
  out_BxGxRxLxK = run(q_BxGxRxLxK, k_BxGxLxK, v_BxGxLxK, segment_BxL.astype(jnp.int32))
  return out_BxGxRxLxK.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def attention_fallback(impl: str, *, backend: str, dtype: Any, head_dim: int, length: int,
                       dense_bias: bool) -> str | None:
  """Why `impl` cannot serve this attention call (None when it can)."""
  if impl == "cudnn":
    if backend not in ("gpu", "cuda", "rocm"):
      return f"cuDNN needs a GPU (backend is {backend!r})"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
      return f"cuDNN flash attention needs bf16/fp16 (compute dtype is {jnp.dtype(dtype)})"
    if head_dim % 8 or head_dim > 128:
      return f"cuDNN flash attention needs head_dim <= 128 and a multiple of 8, got {head_dim}"
    if length % 2:
      return f"cuDNN flash attention with a mask needs an even length, got {length}"
  elif impl == "splash":
    if backend != "tpu":
      return f"splash attention needs a TPU (backend is {backend!r})"
    if dense_bias:
      return "splash attention takes segment ids and causality, not an additive bias"
    if not any(length % b == 0 for b in _SPLASH_BLOCKS if b <= length) and length > 128:
      return f"splash attention needs a length divisible by 128, got {length}"
  return None


@functools.lru_cache(maxsize=None)
def _log_fallback(requested: str, chosen: str, reason: str) -> None:
  # Cached: one line per distinct case, not one per layer or per trace.
  log.warning("attention_impl=%r -> %r: %s", requested, chosen, reason)


def select_attention_impl(impl: str, *, dtype: Any, head_dim: int, length: int,
                          dense_bias: bool = False, backend: str | None = None) -> str:
  """The implementation that serves a call: "auto" per backend, "xla" when one cannot."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
  backend = backend or jax.default_backend()
  want = _AUTO_IMPL.get(backend, "xla") if impl == "auto" else impl
  if want == "xla":
    return "xla"
  reason = attention_fallback(want, backend=backend, dtype=dtype, head_dim=head_dim,
                              length=length, dense_bias=dense_bias)
  if reason is None:
    return want
  _log_fallback(impl, "xla", reason)
  return "xla"


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array, *,
                          segment_BxL: jax.Array, causal: bool, impl: str = "xla",
                          mask_BxLxL: jax.Array | None = None,
                          bias_BxLxL: jax.Array | None = None) -> jax.Array:
  """Multi-head / grouped-query attention; the mask is built from segments unless given.

  `bias_BxLxL` is added to the attention logits (e.g. MrT5 soft deletion). `impl` is
  resolved by `select_attention_impl` ("auto", or a choice that cannot serve this call,
  runs what can).
  """
  impl = select_attention_impl(impl, dtype=q_BxLxHxK.dtype, head_dim=q_BxLxHxK.shape[-1],
                               length=q_BxLxHxK.shape[1], dense_bias=bias_BxLxL is not None)
  if impl == "splash":
    if mask_BxLxL is not None or bias_BxLxL is not None:
      raise ValueError("splash attention takes segment ids and causality, not a dense "
                       "mask or bias")
    return _splash_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_BxL, causal)
  if mask_BxLxL is None:
    mask_BxLxL = segment_mask(segment_BxL, causal)
  if impl == "xla":
    return _xla_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL, bias_BxLxL)
  if impl == "cudnn":
    return _cudnn_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxLxL, causal, bias_BxLxL)
  raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


class Attention(nnx.Module):
  """Self-attention with RoPE and grouped-query heads (num_kv_heads divides num_heads)."""

  def __init__(self, cfg: TransformerConfig, *, causal: bool, impl: str, compute_dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = to_dtype(param_dtype)
    self.cfg, self.causal, self.impl = cfg, causal, impl
    self.compute_dtype = to_dtype(compute_dtype)
    self.wq = param(rngs, (d, h, k), ("embed", "heads", "head_dim"), fan_in=d, dtype=pd)
    self.wk = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), fan_in=d, dtype=pd)
    self.wv = param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), fan_in=d, dtype=pd)
    self.wo = param(rngs, (h, k, d), ("heads", "head_dim", "embed"), fan_in=h * k, dtype=pd)

  def qkv(self, x_BxLxD: jax.Array, pos_BxL: jax.Array):
    """Queries, keys and values with RoPE: (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)."""
    cd = self.compute_dtype
    x = x_BxLxD.astype(cd)
    q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, self.wq[...].astype(cd))
    k_BxLxGxK = jnp.einsum("bld,dgk->blgk", x, self.wk[...].astype(cd))
    v_BxLxGxK = jnp.einsum("bld,dgk->blgk", x, self.wv[...].astype(cd))
    theta = self.cfg.rope_theta
    return rope(q_BxLxHxK, pos_BxL, theta), rope(k_BxLxGxK, pos_BxL, theta), v_BxLxGxK

  def out(self, att_BxLxHxK: jax.Array) -> jax.Array:
    """Output projection of the attended values."""
    cd = self.compute_dtype
    return jnp.einsum("blhk,hkd->bld", att_BxLxHxK.astype(cd), self.wo[...].astype(cd))

  def __call__(self, x_BxLxD: jax.Array, *, segment_BxL: jax.Array, pos_BxL: jax.Array,
               mask_BxLxL: jax.Array | None = None,
               bias_BxLxL: jax.Array | None = None) -> jax.Array:
    q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self.qkv(x_BxLxD, pos_BxL)
    q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
    k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
    v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
    out_BxLxHxK = dot_product_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                        segment_BxL=segment_BxL, causal=self.causal,
                                        impl=self.impl, mask_BxLxL=mask_BxLxL,
                                        bias_BxLxL=bias_BxLxL)
    return self.out(out_BxLxHxK)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: TransformerConfig, *, compute_dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.mlp_dim, to_dtype(param_dtype)
    self.compute_dtype = to_dtype(compute_dtype)
    self.w_gate = param(rngs, (d, f), ("embed", "mlp"), fan_in=d, dtype=pd)
    self.w_up = param(rngs, (d, f), ("embed", "mlp"), fan_in=d, dtype=pd)
    self.w_down = param(rngs, (f, d), ("mlp", "embed"), fan_in=f, dtype=pd)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    x = x_BxLxD.astype(cd)
    gate_BxLxF = jnp.einsum("bld,df->blf", x, self.w_gate[...].astype(cd))
    up_BxLxF = jnp.einsum("bld,df->blf", x, self.w_up[...].astype(cd))
    h_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
    return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_down[...].astype(cd))


class Block(nnx.Module):
  """Pre-norm Llama block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: TransformerConfig, *, causal: bool, impl: str, compute_dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.attn = Attention(cfg, causal=causal, impl=impl, compute_dtype=compute_dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype)
    self.mlp = MLP(cfg, compute_dtype=compute_dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, *, segment_BxL: jax.Array, pos_BxL: jax.Array,
               mask_BxLxL: jax.Array | None = None,
               bias_BxLxL: jax.Array | None = None) -> jax.Array:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segment_BxL=segment_BxL,
                                  pos_BxL=pos_BxL, mask_BxLxL=mask_BxLxL,
                                  bias_BxLxL=bias_BxLxL)
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return constrain(x_BxLxD, ("batch", "length", "embed"))


def _block_fn(graphdef, remat: str):
  """Pure (state, x, ...) -> x for one block, checkpointed per the remat policy."""

  def apply(state, x_BxLxD, segment_BxL, pos_BxL, mask_BxLxL, bias_BxLxL):
    block = nnx.merge(graphdef, state)
    return block(x_BxLxD, segment_BxL=segment_BxL, pos_BxL=pos_BxL, mask_BxLxL=mask_BxLxL,
                 bias_BxLxL=bias_BxLxL)

  if remat == "none":
    return apply
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of none|{'|'.join(REMAT_POLICIES)}, got {remat!r}")
  return jax.checkpoint(apply, policy=REMAT_POLICIES[remat], prevent_cse=False)


class TransformerStack(nnx.Module):
  """`num_layers` blocks plus a final RMSNorm; layers stacked and scanned when scan_layers.

  Scanned: one Block is created per layer under `nnx.vmap`, so every parameter gets a
  leading 'layers' axis, and the forward pass is one `jax.lax.scan` over that axis whose
  body merges the layer's state back into a Block; compile time does not grow with
  depth. Not scanned: a plain list of Blocks (easier to inspect, same numerics).
  """

  def __init__(self, cfg: TransformerConfig, *, causal: bool, attention_impl: str = "xla",
               compute_dtype: Any = "float32", param_dtype: Any = "float32",
               remat: str = "none", scan_layers: bool = True, final_norm: bool = True,
               rngs: nnx.Rngs):
    if attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
    self.cfg, self.causal, self.impl = cfg, causal, attention_impl
    self.compute_dtype = compute_dtype
    self.remat, self.scan_layers = remat, scan_layers
    make = functools.partial(Block, cfg, causal=causal, impl=attention_impl,
                             compute_dtype=compute_dtype, param_dtype=param_dtype)
    if scan_layers:
      keys = jax.random.split(rngs.params(), cfg.num_layers)
      self.layers = nnx.vmap(lambda key: make(rngs=nnx.Rngs(params=key)))(keys)
    else:
      self.blocks = nnx.List([make(rngs=rngs) for _ in range(cfg.num_layers)])
    # A stack split in two (a gate between its halves) has no norm after the lower half.
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=param_dtype) \
        if final_norm else None

  def layer_blocks(self) -> list[Block]:
    """The blocks layer by layer (when scanned, each a slice of the stacked weights)."""
    if not self.scan_layers:
      return list(self.blocks)
    graphdef, state = nnx.split(self.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.cfg.num_layers)]

  def unstack(self) -> None:
    """Turns a scanned stack into its list of blocks, in place; layer i keeps its weights.

    For decoding: a scan over layers slices every layer's weights out of the stacked
    arrays at each step, a copy XLA makes every time (on CPU about 35 us of a 2-layer
    tiny backbone step that takes 45 us without it). A list of blocks reads them in place.
    """
    if self.scan_layers:
      self.blocks = nnx.List(self.layer_blocks())
      del self.layers
      self.scan_layers = False

  def __call__(self, x_BxLxD: jax.Array, *, segment_BxL: jax.Array, pos_BxL: jax.Array,
               key_bias_BxL: jax.Array | None = None) -> jax.Array:
    """Runs all layers and the final norm; attention stays within equal segment ids.

    `key_bias_BxL` is added to the attention logits of every key except the query's own
    position (MrT5 soft deletion: a deleted position is ignored by others, not itself).
    """
    impl = select_attention_impl(self.impl, dtype=to_dtype(self.compute_dtype),
                                 head_dim=self.cfg.head_dim, length=segment_BxL.shape[1],
                                 dense_bias=key_bias_BxL is not None)
    # Splash reads segment ids itself: no dense (B, L, L) mask for it.
    mask_BxLxL = None if impl == "splash" else segment_mask(segment_BxL, self.causal)
    bias_BxLxL = None
    if key_bias_BxL is not None:
      length = key_bias_BxL.shape[1]
      off_diag_LxL = ~jnp.eye(length, dtype=jnp.bool_)
      bias_BxLxL = jnp.where(off_diag_LxL[None], key_bias_BxL[:, None, :], 0.0)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))
    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      fn = _block_fn(graphdef, self.remat)

      def body(x, layer_state):
        return fn(layer_state, x, segment_BxL, pos_BxL, mask_BxLxL, bias_BxLxL), None

      x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, state)
    else:
      for block in self.blocks:
        graphdef, state = nnx.split(block)
        x_BxLxD = _block_fn(graphdef, self.remat)(state, x_BxLxD, segment_BxL, pos_BxL,
                                                  mask_BxLxL, bias_BxLxL)
    return self.final_norm(x_BxLxD) if self.final_norm is not None else x_BxLxD

  def init_cache(self, batch: int, capacity: int, dtype: Any = jnp.float32) -> dict:
    """Empty KV cache of this stack: see `init_kv_cache`."""
    return init_kv_cache(self.cfg, batch, capacity, dtype)

  def extend(self, x_NxTxD: jax.Array, *, pos_NxT: jax.Array, cache: dict,
             keep_NxT: jax.Array | None = None,
             rows_N: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Runs T new positions of N rows against the KV cache -> (y_NxTxD, updated cache).

    Prefill (T > 1) and one decoding step (T = 1) alike. Each new position attends to
    the row's cached entries, to the kept new positions before it, and to itself. Only
    positions with `keep_NxT` (default all) are appended, compacted, in order; a full
    cache drops further entries (the first-M policy of hard deletion). `rows_N` names
    the cache rows of the N inputs (default: all B rows in order); rows whose positions
    are all unkept may repeat (padding). Writes are scatters into each layer's buffer:
    under jit with a donated cache nothing is copied. The layers run unrolled; a scanned
    stack's weights are sliced per call (`unstack` first to decode many steps).
    """
    step = self._cache_step(x_NxTxD, cache, keep_NxT, rows_N)
    k_layers, v_layers = list(cache["k"]), list(cache["v"])
    for layer, block in enumerate(self.layer_blocks()):
      x_NxTxD, k_layers[layer], v_layers[layer] = block_extend(
          block, x_NxTxD, pos_NxT, k_layers[layer], v_layers[layer], step)
    return self._final(x_NxTxD), {"k": k_layers, "v": v_layers,
                                  "length_B": _grown(cache, step.rows_N, step.added_N)}

  def step(self, x_Nx1xD: jax.Array, *, pos_NxT: jax.Array, cache: dict,
           keep_NxT: jax.Array | None = None,
           rows_N: jax.Array | None = None) -> tuple[jax.Array, "KVWrite"]:
    """`extend` by one position per row that only reads the cache -> (y_Nx1xD, new
    entries); `write_kv` stores them.

    A new position sees only older entries (and itself through `self_kv`), so the
    write can come after every layer has read, and outside a `lax.cond` that decides
    whether the step runs at all: a branch that returns the caches makes XLA copy them.
    """
    if x_Nx1xD.shape[1] != 1:
      raise ValueError(f"step takes one position per row, got {x_Nx1xD.shape[1]}")
    step = self._cache_step(x_Nx1xD, cache, keep_NxT, rows_N)
    k_layers, v_layers = [], []
    for layer, block in enumerate(self.layer_blocks()):
      x_Nx1xD, k_Nx1xGxK, v_Nx1xGxK = block_step(
          block, x_Nx1xD, pos_NxT, cache["k"][layer], cache["v"][layer], step)
      k_layers.append(k_Nx1xGxK)
      v_layers.append(v_Nx1xGxK)
    return self._final(x_Nx1xD), KVWrite(k_layers, v_layers, step.rows_N, step.index_NxT,
                                         step.added_N)

  def _final(self, x_NxTxD: jax.Array) -> jax.Array:
    return self.final_norm(x_NxTxD) if self.final_norm is not None else x_NxTxD

  def _cache_step(self, x_NxTxD: jax.Array, cache: dict, keep_NxT: jax.Array | None,
                  rows_N: jax.Array | None) -> "CacheStep":
    """Rows, write slots, visibility and read span of one extend, shared by its layers."""
    if not self.causal:
      raise ValueError("a KV cache only serves causal attention")
    num, num_new = x_NxTxD.shape[:2]
    if keep_NxT is None:
      keep_NxT = jnp.ones((num, num_new), jnp.bool_)
    all_rows = rows_N is None and num == cache["length_B"].shape[0]
    if rows_N is None:
      rows_N = jnp.arange(num)
    k_buffer = cache["k"][0]
    capacity = k_buffer.shape[2]
    length_N = cache["length_B"][rows_N]
    added_N = jnp.sum(keep_NxT, axis=1, dtype=jnp.int32)
    index_NxT, visible_NxTxM = cache_slots(length_N, keep_NxT, capacity)
    # Read only as far as the longest row reaches (a decoding step would read the whole
    # cache, mostly empty until a long context fills it).
    read_bytes = num * k_buffer[0].size * k_buffer.dtype.itemsize
    spans = cache_spans(capacity) if read_bytes > SPAN_MIN_BYTES else [capacity]
    return CacheStep(rows_N, index_NxT, visible_NxTxM, added_N, all_rows, spans,
                     jnp.sum(jnp.array(spans[:-1]) < jnp.max(length_N + added_N)))


class KVWrite(NamedTuple):
  """New entries of one cache step, not yet written (`TransformerStack.step`)."""

  k_layers: list[jax.Array]  # (N, T, G, K) per layer
  v_layers: list[jax.Array]
  rows_N: jax.Array
  index_NxT: jax.Array  # where each goes (capacity: nowhere)
  added_N: jax.Array


def write_kv(cache: dict, new: KVWrite, enabled: jax.Array | bool = True) -> dict:
  """The cache with `new` written (scatters into each layer's buffer, in place under a
  donated jit); nothing is written where `enabled` is false."""
  capacity = cache["k"][0].shape[2]
  index_NxT, added_N = new.index_NxT, new.added_N
  if enabled is not True:
    index_NxT = jnp.where(enabled, index_NxT, capacity)
    added_N = jnp.where(enabled, added_N, 0)
  k_layers = [_scatter(k, k_new, new.rows_N, index_NxT)
              for k, k_new in zip(cache["k"], new.k_layers)]
  v_layers = [_scatter(v, v_new, new.rows_N, index_NxT)
              for v, v_new in zip(cache["v"], new.v_layers)]
  return {"k": k_layers, "v": v_layers, "length_B": _grown(cache, new.rows_N, added_N)}


def _grown(cache: dict, rows_N: jax.Array, added_N: jax.Array) -> jax.Array:
  """The cache's lengths after `added_N` entries went to `rows_N` (at most capacity)."""
  capacity = cache["k"][0].shape[2]
  return jnp.minimum(cache["length_B"].at[rows_N].add(added_N), capacity)


def init_kv_cache(cfg: TransformerConfig, batch: int, capacity: int,
                  dtype: Any = jnp.float32) -> dict:
  """Empty KV cache: "k", "v" (a list of (B, kv_heads, capacity, head_dim) per layer),
  "length_B".

  One buffer per layer: a step scatters into and reads each buffer once, so XLA updates
  them in place (one stacked buffer written layer after layer made it copy the whole
  cache at every word step).
  """
  shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
  return {"k": [jnp.zeros(shape, to_dtype(dtype)) for _ in range(cfg.num_layers)],
          "v": [jnp.zeros(shape, to_dtype(dtype)) for _ in range(cfg.num_layers)],
          "length_B": jnp.zeros((batch,), jnp.int32)}


def _scatter(buffer_BxGxMxK: jax.Array, new_NxTxGxK: jax.Array, rows_N: jax.Array,
             index_NxT: jax.Array) -> jax.Array:
  """New entries into a layer's buffer ("drop": a clamped write would hit valid ones)."""
  row_NxT = jnp.broadcast_to(rows_N[:, None], index_NxT.shape)
  return buffer_BxGxMxK.at[row_NxT, :, index_NxT].set(
      new_NxTxGxK.astype(buffer_BxGxMxK.dtype), mode="drop")


# Below this many bytes per cache read, choosing a shorter span costs more than it saves.
# At 16 KB, batch-1 decoding (reads of 64-80 KB) uses spans too: random-weight ticks of
# 47 -> 44 us (HAT) and 344 -> 300 us (BPE) on a 2-core CPU against 256 KB.
SPAN_MIN_BYTES = 2**14


def cache_spans(capacity: int, smallest: int = 16, num: int = 4) -> list[int]:
  """How far a cached attention reads: capacity, capacity/2, ... (at most `num`, >= smallest)."""
  spans = [capacity]
  while len(spans) < num and spans[-1] % 2 == 0 and spans[-1] // 2 >= smallest:
    spans.append(spans[-1] // 2)
  return sorted(spans)


def cache_slots(length_N: jax.Array, keep_NxT: jax.Array,
                capacity: int) -> tuple[jax.Array, jax.Array]:
  """Where kept new positions go (capacity = dropped) and what each new query sees.

  Returns (index_NxT, visible_NxTxM): kept position t is written at length + (kept
  positions before t); query t sees cache entries below that, its own key aside.
  """
  keep = keep_NxT.astype(jnp.int32)
  before_NxT = length_N[:, None] + jnp.cumsum(keep, axis=1) - keep
  index_NxT = jnp.where(keep_NxT & (before_NxT < capacity), before_NxT, capacity)
  visible_NxTxM = jnp.arange(capacity)[None, None, :] < before_NxT[:, :, None]
  return index_NxT, visible_NxTxM


class CacheStep(NamedTuple):
  """What every layer of one `extend` shares: rows, write slots, visibility, read span."""

  rows_N: jax.Array
  index_NxT: jax.Array  # where each new position is written (capacity: dropped)
  visible_NxTxM: jax.Array  # which cache entries each new query sees
  added_N: jax.Array  # kept new positions per row
  all_rows: bool  # rows_N is every cache row in order (N = B)
  spans: list[int]  # how far a read may go (`cache_spans`)
  span_index: jax.Array  # the shortest span that holds every row


def block_extend(block: Block, x_NxTxD: jax.Array, pos_NxT: jax.Array,
                 k_BxGxMxK: jax.Array, v_BxGxMxK: jax.Array, step: CacheStep
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One block over new positions with its layer's cache, written in place first (later
  new positions see the earlier ones)."""
  q_NxTxHxK, k_NxTxGxK, v_NxTxGxK = block.attn.qkv(block.attn_norm(x_NxTxD), pos_NxT)
  k_BxGxMxK = _scatter(k_BxGxMxK, k_NxTxGxK, step.rows_N, step.index_NxT)
  v_BxGxMxK = _scatter(v_BxGxMxK, v_NxTxGxK, step.rows_N, step.index_NxT)
  att_NxTxHxK = _cached_attention(block.attn, q_NxTxHxK, k_NxTxGxK, v_NxTxGxK,
                                  k_BxGxMxK, v_BxGxMxK, step)
  return _block_out(block, x_NxTxD, att_NxTxHxK), k_BxGxMxK, v_BxGxMxK


def block_step(block: Block, x_Nx1xD: jax.Array, pos_Nx1: jax.Array,
               k_BxGxMxK: jax.Array, v_BxGxMxK: jax.Array, step: CacheStep
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One block over one new position per row, reading its layer's cache only ->
  (y, k_Nx1xGxK, v_Nx1xGxK): the new position sees the entries already there."""
  q_Nx1xHxK, k_Nx1xGxK, v_Nx1xGxK = block.attn.qkv(block.attn_norm(x_Nx1xD), pos_Nx1)
  att_Nx1xHxK = _cached_attention(block.attn, q_Nx1xHxK, k_Nx1xGxK, v_Nx1xGxK,
                                  k_BxGxMxK, v_BxGxMxK, step)
  return _block_out(block, x_Nx1xD, att_Nx1xHxK), k_Nx1xGxK, v_Nx1xGxK


def _cached_attention(attn: "Attention", q_NxTxHxK, k_NxTxGxK, v_NxTxGxK,
                      k_BxGxMxK: jax.Array, v_BxGxMxK: jax.Array, step: CacheStep
                      ) -> jax.Array:
  """The N rows' queries over their cache entries (and their own keys), reading the
  shortest span that holds every row (`lax.switch` over `step.spans`)."""
  cd = attn.compute_dtype

  def read(span: int) -> jax.Array:
    k_BxGxSxK, v_BxGxSxK = k_BxGxMxK[:, :, :span], v_BxGxMxK[:, :, :span]
    if not step.all_rows:  # rows_N is always in range (padding repeats a row)
      k_BxGxSxK = k_BxGxSxK.at[step.rows_N].get(mode="promise_in_bounds")
      v_BxGxSxK = v_BxGxSxK.at[step.rows_N].get(mode="promise_in_bounds")
    return attend(q_NxTxHxK, k_BxGxSxK.astype(cd), v_BxGxSxK.astype(cd),
                  step.visible_NxTxM[..., :span], self_kv=(k_NxTxGxK, v_NxTxGxK))

  return jax.lax.switch(step.span_index, [functools.partial(read, span)
                                          for span in step.spans])


def _block_out(block: Block, x_NxTxD: jax.Array, att_NxTxHxK: jax.Array) -> jax.Array:
  """The rest of a block after its attention: output projection, residuals, MLP."""
  x_NxTxD = x_NxTxD + block.attn.out(att_NxTxHxK)
  return x_NxTxD + block.mlp(block.mlp_norm(x_NxTxD))
