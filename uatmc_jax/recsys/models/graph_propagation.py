"""Ŷ = Â X for a symmetric sparse Â, as one primitive with CSR kernels and exact rules.

Graph models (MMGCN) spend most of a step on ``Â X`` and its transpose. The plain JAX
form, ``segment_sum(take(X, src) * w, dst)``, lowers on CPU to an (E, k) gather plus a
scatter, and its reverse-mode adds another gather and an *unsorted* scatter-add. Here
``Â X`` is one CSR sparse × dense product (``jax.experimental.sparse.BCSR``: on CPU a
native kernel, on GPU cuSPARSE or the generic lowering), and because Â is symmetric
(Â = D^{-1/2} A D^{-1/2} of an undirected graph, both edge directions listed with equal
weights) its transpose is the same product again, so reverse mode never scatters.

:func:`symmetric_propagate` is a JAX primitive with

* a JVP rule: linear in X (the tangent is the primitive again); a tangent of the edge
  weights, if any, goes through the plain ``segment_sum`` form (exact, rarely used);
* a transpose rule for X: Âᵀ = Â, the primitive again;
* a batching rule: a vmapped X (e.g. one perturbed feature table per attack target) is
  folded into the columns, (B, N, k) -> (N, B·k), one product; a vmapped graph falls
  back to the plain form under ``vmap``.

So ``jit``, ``grad``, ``jvp``, ``vmap`` and their compositions all work and equal the
plain form (tests/test_graph_propagation.py checks values, VJPs, JVPs and vmaps against
a dense-adjacency numpy reference).

Contract: ``dst`` sorted ascending (CSR rows), the edge list symmetric — for every edge
(d, s, w) the edge (s, d, w) is present — as :func:`uatmc_jax.recsys.models.mmgcn.bipartite_edges`
builds it. The primitive cannot check symmetry inside ``jit``; :func:`is_symmetric` does
it on host arrays (MMGCN checks its graph once at construction).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

__all__ = ["symmetric_propagate", "segment_propagate", "is_symmetric"]


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


def _csr_product(weight, dst, src, indptr, x):
  del dst  # the CSR rows are given by indptr
  n = x.shape[0]
  flat = x.reshape(n, -1)
  out = sparse.BCSR((weight.astype(x.dtype), src, indptr), shape=(n, n),
                    indices_sorted=True, unique_indices=True) @ flat
  return out.reshape(x.shape)


_propagate_p = jex_core.Primitive("symmetric_propagate")
_propagate_p.def_impl(_csr_product)
_propagate_p.def_abstract_eval(
    lambda weight, dst, src, indptr, x: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(_propagate_p, mlir.lower_fun(_csr_product, multiple_results=False))


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
    out = jax.vmap(lambda w, d, s, _, v: segment_propagate(v, d, s, w), in_axes=dims)(*args)
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
