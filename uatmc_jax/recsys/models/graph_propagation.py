"""Ŷ = Â X for a symmetric sparse Â, as one primitive with exact rules and per-platform kernels.

Graph models (MMGCN) spend most of a step on ``Â X`` and its transpose. The plain JAX
form, ``segment_sum(take(X, src) * w, dst)``, lowers to an (E, k) gather of every edge's
message plus a scatter, and its reverse mode adds another gather and an *unsorted*
scatter-add. Here ``Â X`` is one primitive, and because Â is symmetric
(Â = D^{-1/2} A D^{-1/2} of an undirected graph, both edge directions listed with equal
weights) its transpose is the same product again, so reverse mode never scatters.

Lowering, per platform:

* CPU: one CSR sparse × dense product (``jax.experimental.sparse.BCSR``), XLA's native
  CPU kernel.
* GPU and TPU (any other platform): :func:`chunked_propagate`, a ``fori_loop`` over
  fixed-size chunks of the dst-sorted edge list; per chunk the messages are gathered and
  summed per destination row with a sorted ``segment_sum`` into at most chunk-size
  partial rows, which are added to the output (distinct, sorted rows). Working memory is
  the output plus O(chunk × columns), whatever the number of edges (``BCSR @ dense``
  there would be a gather of all E messages and an unsorted scatter-add: an (E, k)
  temporary). Accumulation is float32 for any input dtype. This path does not call
  cuSPARSE. The within-chunk ``segment_sum`` is an XLA scatter with sorted indices;
  whether XLA runs it with atomics (float32 order not fixed run to run) depends on the
  backend (``--xla_gpu_deterministic_ops`` makes it deterministic on GPU).

:func:`symmetric_propagate` is a JAX primitive with

* a JVP rule: linear in X (the tangent is the primitive again); a tangent of the edge
  weights, if any, goes through the plain ``segment_sum`` form (exact, rarely used);
* a transpose rule for X: Âᵀ = Â, the primitive again;
* a batching rule: a vmapped X (e.g. one perturbed feature table per attack target) is
  folded into the columns, (B, N, k) -> (N, B·k), one product; a vmapped graph falls
  back to the plain form under ``vmap`` (in x's dtype).

So ``jit``, ``grad``, ``jvp``, ``vmap`` and their compositions all work and equal the
plain form (tests/test_graph_propagation.py checks values, VJPs, JVPs and vmaps against
a dense-adjacency numpy reference; tests/test_attack_scale.py checks the GPU/TPU
lowering run on CPU and its memory bound).

Contract: ``dst`` sorted ascending (CSR rows), the edge list symmetric — for every edge
(d, s, w) the edge (s, d, w) is present — as :func:`uatmc_jax.recsys.models.mmgcn.bipartite_edges`
builds it. The transpose rule is the adjoint only then. The primitive cannot check
symmetry inside ``jit``; :func:`is_symmetric` does it on host arrays, and ``MMGCN``
checks its graph with it once at construction (``check_symmetric``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from uatmc_jax.core import errors

__all__ = ["symmetric_propagate", "segment_propagate", "is_symmetric", "check_symmetric",
           "chunked_propagate"]


def segment_propagate(x: jax.Array, dst: jax.Array, src: jax.Array,
                      weight: jax.Array) -> jax.Array:
  """The plain form: y[d] = Σ_{e: dst_e = d} weight_e · x[src_e] (any graph, any rank ≥ 1)."""
  messages = jnp.take(x, src, axis=0) * weight.reshape((-1,) + (1,) * (x.ndim - 1))
  return jax.ops.segment_sum(messages, dst, num_segments=x.shape[0], indices_are_sorted=True)


def is_symmetric(dst: np.ndarray, src: np.ndarray, weight: np.ndarray) -> bool:
  """Whether the edge list (dst, src, weight) equals its transpose (src, dst, weight)."""
  dst, src, weight = (np.asarray(a) for a in (dst, src, weight))
  fwd = np.lexsort((src, dst))
  rev = np.lexsort((dst, src))
  return bool(np.array_equal(dst[fwd], src[rev]) and np.array_equal(src[fwd], dst[rev])
              and np.array_equal(weight[fwd], weight[rev]))


def check_symmetric(dst: np.ndarray, src: np.ndarray, weight: np.ndarray,
                    what: str = "graph") -> None:
  """Raises ConfigError unless the edge list is symmetric (the primitive's contract)."""
  if not is_symmetric(dst, src, weight):
    raise errors.ConfigError(
        f"{what}: the edge list (dst, src, weight) is not symmetric (some edge (d, s, w) "
        "lacks its reverse (s, d, w)); symmetric_propagate's backward pass applies Â "
        "again, which is its adjoint only for a symmetric Â")


# Edge messages per chunk × columns, in elements (float32: 64 MiB) on the GPU/TPU path.
CHUNK_ELEMENTS = 1 << 24


def chunked_propagate(weight, dst, src, x, *, chunk_elements: int = CHUNK_ELEMENTS):
  """y = Â x by a loop over edge chunks (the GPU/TPU lowering; any platform runs it).

  Args:
    weight, dst, src: (E,) edge list, ``dst`` sorted ascending.
    x: (N, ...) node rows.
    chunk_elements: edges per chunk × columns (the chunk's message block).

  Returns:
    (N, ...) in x's dtype, accumulated in float32 (or x's dtype if wider).
  """
  n = x.shape[0]
  flat = x.reshape(n, -1)
  cols = flat.shape[1]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  e = dst.shape[0]
  if e == 0 or n == 0:
    return jnp.zeros(x.shape, x.dtype)
  chunk = int(max(1, min(e, chunk_elements // max(cols, 1))))
  n_chunks = -(-e // chunk)
  local = jnp.arange(chunk, dtype=jnp.int32)

  def body(c, out):
    first = c * chunk
    start = jnp.minimum(first, e - chunk)  # the last chunk overlaps; its repeats masked
    d = jax.lax.dynamic_slice_in_dim(dst, start, chunk)
    s = jax.lax.dynamic_slice_in_dim(src, start, chunk)
    w = jax.lax.dynamic_slice_in_dim(weight, start, chunk).astype(acc)
    w = jnp.where(start + local >= first, w, 0)
    msgs = jnp.take(flat, s, axis=0).astype(acc) * w[:, None]
    # Local segment = rank of the edge's destination row within the chunk (sorted).
    seg = jnp.concatenate([jnp.zeros(1, jnp.int32),
                           jnp.cumsum((d[1:] != d[:-1]).astype(jnp.int32))])
    partial = jax.ops.segment_sum(msgs, seg, num_segments=chunk, indices_are_sorted=True)
    # Unused segments point past the end, each to its own row (dropped; all distinct).
    rows = (n + local).at[seg].set(d, indices_are_sorted=True)
    return out.at[rows].add(partial, indices_are_sorted=True, unique_indices=True,
                            mode="drop")

  out = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((n, cols), acc))
  return out.astype(x.dtype).reshape(x.shape)


def _chunked_product(weight, dst, src, indptr, x):
  del indptr
  return chunked_propagate(weight, dst, src, x, chunk_elements=CHUNK_ELEMENTS)


def _csr_product(weight, dst, src, indptr, x):
  del dst  # the CSR rows are given by indptr
  n = x.shape[0]
  flat = x.reshape(n, -1)
  out = sparse.BCSR((weight.astype(x.dtype), src, indptr), shape=(n, n),
                    indices_sorted=True, unique_indices=True) @ flat
  return out.reshape(x.shape)


_propagate_p = jex_core.Primitive("symmetric_propagate")
# Eager calls run the jitted primitive, so they take the platform's lowering too.
_propagate_p.def_impl(jax.jit(lambda *args: _propagate_p.bind(*args)))
_propagate_p.def_abstract_eval(
    lambda weight, dst, src, indptr, x: jax.core.ShapedArray(x.shape, x.dtype))
# Default (GPU, TPU, any platform): the chunked segment sums; CPU: the CSR kernel.
mlir.register_lowering(_propagate_p, mlir.lower_fun(_chunked_product, multiple_results=False))
mlir.register_lowering(_propagate_p, mlir.lower_fun(_csr_product, multiple_results=False),
                       platform="cpu")


def _jvp(primals, tangents):
  weight, dst, src, indptr, x = primals
  t_weight, _, _, _, t_x = tangents
  y = _propagate_p.bind(weight, dst, src, indptr, x)
  parts = []
  if type(t_x) is not ad.Zero:
    parts.append(_propagate_p.bind(weight, dst, src, indptr, t_x))
  if type(t_weight) is not ad.Zero:
    parts.append(segment_propagate(x, dst, src, t_weight.astype(x.dtype)))
  t_y = sum(parts[1:], parts[0]) if parts else jnp.zeros_like(y)
  return y, t_y


def _transpose(ct, weight, dst, src, indptr, x):
  if any(ad.is_undefined_primal(a) for a in (weight, dst, src, indptr)):
    raise TypeError("symmetric_propagate is transposed only in x (the edge "
                    "weights' tangent goes through segment_propagate)")
  if type(ct) is ad.Zero:
    return None, None, None, None, ad.Zero(x.aval)
  return None, None, None, None, _propagate_p.bind(weight, dst, src, indptr, ct)


def _batch(args, dims):
  weight, dst, src, indptr, x = args
  if any(d is not None for d in dims[:4]):  # a batch of graphs: the plain form
    out = jax.vmap(lambda w, d, s, _, v: segment_propagate(v, d, s, w.astype(v.dtype)),
                   in_axes=dims)(*args)
    return out, 0
  x = jnp.moveaxis(x, dims[4], 1)  # (N, B, ...): the batch becomes columns
  return _propagate_p.bind(weight, dst, src, indptr, x), 1


ad.primitive_jvps[_propagate_p] = _jvp
ad.primitive_transposes[_propagate_p] = _transpose
batching.primitive_batchers[_propagate_p] = _batch


def symmetric_propagate(x: jax.Array, dst: jax.Array, src: jax.Array,
                        weight: jax.Array) -> jax.Array:
  """Â x with Â given by a symmetric edge list sorted by ``dst`` (see the module notes).

  Args:
    x: (N, ...) node rows (N = number of nodes; trailing axes are columns).
    dst, src: int (E,) edge heads (sorted ascending) and tails, node ids in [0, N).
    weight: (E,) edge weights.

  Returns:
    (N, ...) y with y[d] = Σ_{e: dst_e = d} weight_e · x[src_e].
  """
  if x.ndim < 1:
    raise ValueError(f"symmetric_propagate: x must have a node axis, got shape {x.shape}")
  if not (dst.shape == src.shape == weight.shape and dst.ndim == 1):
    raise ValueError(f"symmetric_propagate: dst, src, weight must be equal (E,) vectors, "
                     f"got {dst.shape}, {src.shape}, {weight.shape}")
  src = src.astype(jnp.int32)
  dst = dst.astype(jnp.int32)
  indptr = jnp.searchsorted(dst, jnp.arange(x.shape[0] + 1, dtype=jnp.int32),
                            side="left").astype(jnp.int32)
  return _propagate_p.bind(weight, dst, src, indptr, x)
