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

The bipartite split form, :func:`bipartite_propagate` (x_U, x_I) -> (B x_I, Bᵀ x_U) for
Â = [[0, B], [Bᵀ, 0]] (users first), is the same product for a model that keeps its user
rows and item rows as two tables (``MMGCN.split_forward``): no concatenation of the two
tables before the product and no split after it, in the forward or the backward pass. Its
blocks are the two halves of the same dst-sorted edge list (:func:`bipartite_graph`); it
is one primitive with the same rules (JVP linear in the tables, transpose = itself,
vmap folds the batch into the columns) and the same lowerings per block (CPU: two CSR
products; elsewhere: :func:`chunked_propagate` with ``num_rows``).
tests/test_mmgcn_train_speed.py checks it against the dense blocks.

Contract: ``dst`` sorted ascending (CSR rows), the edge list symmetric — for every edge
(d, s, w) the edge (s, d, w) is present — as :func:`uatmc_jax.recsys.models.mmgcn.bipartite_edges`
builds it. The transpose rule is the adjoint only then. The primitive cannot check
symmetry inside ``jit``; :func:`is_symmetric` does it on host arrays, and ``MMGCN``
checks its graph with it once at construction (``check_symmetric``).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from uatmc_jax.core import errors

__all__ = ["symmetric_propagate", "segment_propagate", "is_symmetric", "check_symmetric",
           "chunked_propagate", "BipartiteGraph", "bipartite_graph", "bipartite_propagate",
           "bipartite_segment_propagate"]


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


def chunked_propagate(weight, dst, src, x, *, chunk_elements: int = CHUNK_ELEMENTS,
                      num_rows: int | None = None):
  """y = Â x by a loop over edge chunks (the GPU/TPU lowering; any platform runs it).

  Args:
    weight, dst, src: (E,) edge list, ``dst`` sorted ascending.
    x: (N, ...) node rows.
    chunk_elements: edges per chunk × columns (the chunk's message block).
    num_rows: rows of y (default N; a rectangular block of a graph has dst in
      [0, num_rows) and src in [0, N)).

  Returns:
    (num_rows, ...) in x's dtype, accumulated in float32 (or x's dtype if wider).
  """
  n = x.shape[0] if num_rows is None else int(num_rows)
  out_shape = (n,) + x.shape[1:]
  flat = x.reshape(x.shape[0], -1)
  cols = flat.shape[1]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  e = dst.shape[0]
  if e == 0 or n == 0:
    return jnp.zeros(out_shape, x.dtype)
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
  return out.astype(x.dtype).reshape(out_shape)


def _chunked_product(weight, dst, src, indptr, x):
  del indptr
  return chunked_propagate(weight, dst, src, x, chunk_elements=CHUNK_ELEMENTS)


def _csr_product(weight, dst, src, indptr, x):
  del dst  # the CSR rows are given by indptr
  return _csr_block(weight, src, indptr, x)


def _indptr(rows, n: int):
  """CSR row pointers (n + 1,) of a sorted row-id vector."""
  return jnp.searchsorted(rows, jnp.arange(n + 1, dtype=jnp.int32),
                          side="left").astype(jnp.int32)


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
  return _propagate_p.bind(weight, dst, src, _indptr(dst, x.shape[0]), x)


# -- the bipartite split form ------------------------------------------------------------
#
# The user–item graph is bipartite: with users first, Â = [[0, B], [Bᵀ, 0]] (B: U × I).
# A model that keeps its user rows and item rows as two tables needs
#
#   P(x_U, x_I) = (B x_I, Bᵀ x_U),
#
# which is Â [x_U ; x_I] without concatenating the two tables or splitting the result.
# The dst-sorted symmetric edge list holds both halves as CSR blocks already: its first
# edges (dst < U) are the rows of B, the rest (dst >= U) the rows of Bᵀ. P is self-adjoint
# in the same sense as Â (⟨P(x), c⟩ = ⟨x, P(c)⟩ with the pairs (x_U, x_I), (c_U, c_I)),
# so its transpose is P again, and its two halves are independent kernels (on CPU two CSR
# products that may run side by side).


class BipartiteGraph(NamedTuple):
  """The two CSR blocks of a bipartite Â (users first), as jnp arrays.

  Fields ``*_u``: the user rows (B, U × I): ``rows_u`` (E_u,) local user ids (sorted),
  ``cols_u`` local item ids, ``weight_u``, ``indptr_u`` (U + 1,). Fields ``*_i``: the item
  rows (Bᵀ, I × U), ``cols_i`` local user ids.
  """
  weight_u: jax.Array
  rows_u: jax.Array
  cols_u: jax.Array
  indptr_u: jax.Array
  weight_i: jax.Array
  rows_i: jax.Array
  cols_i: jax.Array
  indptr_i: jax.Array


def bipartite_graph(dst, src, weight, n_users: int, n_items: int,
                    n_user_edges: int) -> BipartiteGraph:
  """The CSR blocks of a symmetric dst-sorted bipartite edge list (jit-safe).

  Args:
    dst, src, weight: (E,) the symmetric edge list of the U + I nodes (users first),
      sorted by ``dst`` (``mmgcn.bipartite_edges``); every edge joins a user and an item.
    n_users, n_items: U and I.
    n_user_edges: the number of edges with ``dst < n_users`` (a static int: the split).
  """
  e_u = int(n_user_edges)
  dst = dst.astype(jnp.int32)
  src = src.astype(jnp.int32)
  rows_u, cols_u = dst[:e_u], src[:e_u] - n_users
  rows_i, cols_i = dst[e_u:] - n_users, src[e_u:]
  return BipartiteGraph(weight[:e_u], rows_u, cols_u, _indptr(rows_u, n_users),
                        weight[e_u:], rows_i, cols_i, _indptr(rows_i, n_items))


def bipartite_segment_propagate(x_users: jax.Array, x_items: jax.Array,
                                graph: BipartiteGraph) -> tuple[jax.Array, jax.Array]:
  """The plain form of :func:`bipartite_propagate` (gather + sorted segment sums)."""
  def half(x, w, rows, cols, n):
    messages = jnp.take(x, cols, axis=0) * w.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return jax.ops.segment_sum(messages, rows, num_segments=n, indices_are_sorted=True)
  n_u, n_i = graph.indptr_u.shape[0] - 1, graph.indptr_i.shape[0] - 1
  return (half(x_items, graph.weight_u, graph.rows_u, graph.cols_u, n_u),
          half(x_users, graph.weight_i, graph.rows_i, graph.cols_i, n_i))


def _csr_block(weight, cols, indptr, x):
  n_rows = indptr.shape[0] - 1
  flat = x.reshape(x.shape[0], -1)
  out = sparse.BCSR((weight.astype(x.dtype), cols, indptr), shape=(n_rows, x.shape[0]),
                    indices_sorted=True, unique_indices=True) @ flat
  return out.reshape((n_rows,) + x.shape[1:])


def _bipartite_csr(w_u, r_u, c_u, p_u, w_i, r_i, c_i, p_i, x_u, x_i):
  del r_u, r_i  # the CSR rows are given by the indptrs
  return _csr_block(w_u, c_u, p_u, x_i), _csr_block(w_i, c_i, p_i, x_u)


def _bipartite_chunked(w_u, r_u, c_u, p_u, w_i, r_i, c_i, p_i, x_u, x_i):
  return (chunked_propagate(w_u, r_u, c_u, x_i, chunk_elements=CHUNK_ELEMENTS,
                            num_rows=p_u.shape[0] - 1),
          chunked_propagate(w_i, r_i, c_i, x_u, chunk_elements=CHUNK_ELEMENTS,
                            num_rows=p_i.shape[0] - 1))


def _bipartite_abstract(w_u, r_u, c_u, p_u, w_i, r_i, c_i, p_i, x_u, x_i):
  return (jax.core.ShapedArray((p_u.shape[0] - 1,) + x_i.shape[1:], x_i.dtype),
          jax.core.ShapedArray((p_i.shape[0] - 1,) + x_u.shape[1:], x_u.dtype))


_bipartite_p = jex_core.Primitive("bipartite_propagate")
_bipartite_p.multiple_results = True
_bipartite_p.def_impl(jax.jit(lambda *args: tuple(_bipartite_p.bind(*args))))
_bipartite_p.def_abstract_eval(_bipartite_abstract)
mlir.register_lowering(_bipartite_p, mlir.lower_fun(_bipartite_chunked, multiple_results=True))
mlir.register_lowering(_bipartite_p, mlir.lower_fun(_bipartite_csr, multiple_results=True),
                       platform="cpu")


def _graph_of(args) -> BipartiteGraph:
  return BipartiteGraph(*args[:8])


def _bipartite_jvp(primals, tangents):
  graph_args, (x_u, x_i) = primals[:8], primals[8:]
  y_u, y_i = _bipartite_p.bind(*primals)
  t_w_u, t_w_i = tangents[0], tangents[4]
  t_x_u, t_x_i = tangents[8:]
  if type(t_x_u) is ad.Zero and type(t_x_i) is ad.Zero:
    t_u, t_i = jnp.zeros_like(y_u), jnp.zeros_like(y_i)
  else:
    t_x_u = ad.instantiate_zeros(t_x_u)
    t_x_i = ad.instantiate_zeros(t_x_i)
    t_u, t_i = _bipartite_p.bind(*graph_args, t_x_u, t_x_i)
  if type(t_w_u) is not ad.Zero or type(t_w_i) is not ad.Zero:
    graph = _graph_of(primals)
    zero = lambda t, w: jnp.zeros_like(w) if type(t) is ad.Zero else t
    tw_graph = graph._replace(weight_u=zero(t_w_u, graph.weight_u),
                              weight_i=zero(t_w_i, graph.weight_i))
    d_u, d_i = bipartite_segment_propagate(x_u, x_i, tw_graph)
    t_u, t_i = t_u + d_u, t_i + d_i
  return (y_u, y_i), (t_u, t_i)


def _bipartite_transpose(cts, *args):
  if any(ad.is_undefined_primal(a) for a in args[:8]):
    raise TypeError("bipartite_propagate is transposed only in its node tables (the edge "
                    "weights' tangent goes through bipartite_segment_propagate)")
  x_u, x_i = args[8:]
  ct_u, ct_i = cts
  if type(ct_u) is ad.Zero and type(ct_i) is ad.Zero:
    return [None] * 8 + [ad.Zero(x.aval) if ad.is_undefined_primal(x) else None
                         for x in (x_u, x_i)]
  # y_u = B x_i, y_i = Bᵀ x_u  =>  dx_u = B ct_i, dx_i = Bᵀ ct_u: the primitive again.
  ct_u = ad.instantiate_zeros(ct_u)
  ct_i = ad.instantiate_zeros(ct_i)
  d_u, d_i = _bipartite_p.bind(*args[:8], ct_u, ct_i)
  return ([None] * 8 + [d_u if ad.is_undefined_primal(x_u) else None,
                        d_i if ad.is_undefined_primal(x_i) else None])


def _bipartite_batch(args, dims):
  if any(d is not None for d in dims[:8]):  # a batch of graphs: the plain form
    graph_dims = BipartiteGraph(*dims[:8])
    out = jax.vmap(lambda g, xu, xi: bipartite_segment_propagate(xu, xi, g),
                   in_axes=(graph_dims, dims[8], dims[9]))(_graph_of(args), *args[8:])
    return out, (0, 0)
  size = next(a.shape[d] for a, d in zip(args[8:], dims[8:]) if d is not None)
  xs = []
  for x, d in zip(args[8:], dims[8:]):  # (N, B, ...): the batch becomes columns
    x = jnp.moveaxis(x, d, 1) if d is not None else jnp.broadcast_to(
        x[:, None], (x.shape[0], size) + x.shape[1:])
    xs.append(x)
  return _bipartite_p.bind(*args[:8], *xs), (1, 1)


ad.primitive_jvps[_bipartite_p] = _bipartite_jvp
ad.primitive_transposes[_bipartite_p] = _bipartite_transpose
batching.primitive_batchers[_bipartite_p] = _bipartite_batch


def bipartite_propagate(x_users: jax.Array, x_items: jax.Array,
                        graph: BipartiteGraph) -> tuple[jax.Array, jax.Array]:
  """(B x_items, Bᵀ x_users) = Â [x_users ; x_items] split back into its two tables.

  Args:
    x_users: (U, ...) user rows; x_items: (I, ...) item rows (trailing axes: columns).
    graph: :func:`bipartite_graph` of a symmetric edge list.

  Returns:
    (users (U, ...x_items columns), items (I, ...x_users columns)).

  One primitive with exact rules (JVP linear in the tables, transpose = itself since
  Â is symmetric, vmap folds a batch into the columns); CPU: two CSR products, other
  platforms: :func:`chunked_propagate` on each block. Contract as for
  :func:`symmetric_propagate` (the edge list symmetric and sorted by dst).
  """
  n_u, n_i = graph.indptr_u.shape[0] - 1, graph.indptr_i.shape[0] - 1
  if x_users.ndim < 1 or x_items.ndim < 1 or x_users.shape[0] != n_u or x_items.shape[0] != n_i:
    raise ValueError(f"bipartite_propagate: x_users must have {n_u} rows and x_items {n_i}, "
                     f"got shapes {x_users.shape}, {x_items.shape}")
  return tuple(_bipartite_p.bind(*graph, x_users, x_items))
