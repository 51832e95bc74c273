"""MMRec's MMGCN architecture: the project's JAX model against a PyTorch one, like with like.

Both sides train the same architecture, ``mmgcn_mmrec`` (uatmc_jax/recsys/models/
mmgcn_mmrec.py: three MMGCN layers per modality, the visual branch projected to 256 before
its first layer, the other modality's first layer on its raw features, later layers at the
ID width 64, mean aggregation over neighbours, the concatenating combination, the node
vector the mean of the branches), with the same protocol (METHODS.md A.3): BPR with one
sampled non-train negative per train pair, batch 2048, Adam lr 1e-3, EmbLoss weight
``--reg_weight``; one epoch = one pass over the train interactions. The batches are the
project's (``recsys.data.sampling.epoch_batches``, seed 999), sampled inside each side's
timed epoch.

The PyTorch side (written here, not MMRec's code; no torch_geometric) is what MMRec does
per step: the full forward over every node (``x W_conv`` then the neighbour mean as one
``torch.sparse.mm`` with a CSR D^{-1}A), the batch's rows gathered from it, the loss,
``backward`` and an Adam step. It starts from the JAX model's initial parameters, and the
run first checks that the two forwards agree (max |difference| printed). The JAX side is
``RecsysTrainer.train_epoch`` on the registry's ``mmgcn_mmrec``.

The two frameworks are timed in alternating rounds (one epoch of each per round, after
one warm-up epoch each, which for JAX includes compilation), so both see the same
machine load; the load average is printed before and after. PyTorch is an optional,
benchmark-only dependency (the ``bench`` extra: ``pip install torch``).

  python benchmarks/bench_mmgcn_torch.py                    # TikTok, 3 rounds
  python benchmarks/bench_mmgcn_torch.py --rounds 5 --torch_threads 1
  python benchmarks/bench_mmgcn_torch.py --profile_dir runs/mmgcn_mmrec_trace  # + JAX trace
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from uatmc_jax.core.parallel.mesh import make_mesh  # noqa: E402
from uatmc_jax.recsys.data.mmrec import load_mmrec  # noqa: E402
from uatmc_jax.recsys.data.sampling import NegativeSampler, epoch_batches  # noqa: E402
from uatmc_jax.recsys.models.registry import build_recommender  # noqa: E402
from uatmc_jax.recsys.trainer import RecsysTrainer  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
SEED = 999
BATCH = 2048
LR = 1e-3


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x), np.float32)


def torch_model(jax_model, features: dict):
  """The PyTorch MMGCN (MMRec architecture) with the JAX model's parameter values."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  m = jax_model
  n_nodes = m.n_users + m.n_items
  dst, src = np.asarray(m.edge_dst[...]), np.asarray(m.edge_src[...])
  deg = np.bincount(dst, minlength=n_nodes).astype(np.float32)
  order = np.lexsort((src, dst))
  indptr = np.concatenate([[0], np.cumsum(deg)]).astype(np.int64)
  mean_adj = torch.sparse_csr_tensor(
      torch.from_numpy(indptr), torch.from_numpy(src[order].astype(np.int64)),
      torch.from_numpy((1.0 / deg[dst[order]]).astype(np.float32)), (n_nodes, n_nodes))

  def param(x):
    return nn.Parameter(torch.from_numpy(_np(x).copy()))

  class Branch(nn.Module):
    def __init__(self, modality):
      super().__init__()
      self.preference = param(m.preference_table(modality))
      self.proj = None
      if modality == m.latent_modality:
        lin = m.feature_proj[modality]
        self.proj = nn.ParameterList([param(lin.kernel[...]), param(lin.bias[...])])
      self.layers = nn.ModuleList()
      for layer in m.branches[modality]:
        block = nn.ParameterDict({
            "conv": param(layer.conv.kernel[...]),
            "lin_w": param(layer.self_linear.kernel[...]),
            "lin_b": param(layer.self_linear.bias[...]),
            "g_w": param(layer.combine.kernel[...]),
            "g_b": param(layer.combine.bias[...])})
        self.layers.append(block)

    def forward(self, feat, ids):
      f = feat @ self.proj[0] + self.proj[1] if self.proj is not None else feat
      x = F.normalize(torch.cat([self.preference, f], 0))
      for p in self.layers:
        h = F.leaky_relu(torch.sparse.mm(mean_adj, x @ p["conv"]))
        x_hat = F.leaky_relu(x @ p["lin_w"] + p["lin_b"]) + ids
        x = F.leaky_relu(torch.cat([h, x_hat], 1) @ p["g_w"] + p["g_b"])
      return x

  class TorchMMGCN(nn.Module):
    def __init__(self):
      super().__init__()
      self.id_embedding = param(m.id_table())
      self.modalities = list(m.modalities)
      self.branches = nn.ModuleDict({k: Branch(k) for k in self.modalities})
      self.features = {k: torch.from_numpy(np.asarray(features[k], np.float32))
                       for k in self.modalities}

    def forward(self):
      outs = [self.branches[k](self.features[k], self.id_embedding) for k in self.modalities]
      return sum(outs) / len(outs)

  return TorchMMGCN()


def torch_epoch_fn(net, data, reg_weight: float):
  """(epoch -> mean loss): MMRec-style steps (full forward per batch) over one epoch."""
  import torch
  opt = torch.optim.Adam(net.parameters(), lr=LR)
  sampler = NegativeSampler(data.train, data.n_users, data.n_items)
  n_users = data.n_users

  def epoch(e: int) -> float:
    b = epoch_batches(sampler, data.train, BATCH, SEED, e)
    total, count = 0.0, 0
    for s in range(b["users"].shape[0]):
      real = b["mask"][s] > 0
      users = torch.from_numpy(b["users"][s][real].astype(np.int64))
      pos = torch.from_numpy(b["pos"][s][real].astype(np.int64)) + n_users
      neg = torch.from_numpy(b["neg"][s][real].astype(np.int64)) + n_users
      nodes = net()
      u, p, n = nodes[users], nodes[pos], nodes[neg]
      bpr = -torch.log(1e-10 + torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
      emb = (u.norm() + p.norm() + n.norm()) / u.shape[0]
      loss = bpr + reg_weight * emb
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      total += float(loss) * int(real.sum())
      count += int(real.sum())
    return total / count

  return epoch


def _load() -> str:
  la = os.getloadavg()
  return f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=str(DATA / "tiktok"), help="MMRec-layout folder")
  p.add_argument("--rounds", type=int, default=3, help="alternating JAX/PyTorch epochs")
  p.add_argument("--reg_weight", type=float, default=1e-4)
  p.add_argument("--torch_threads", type=int, default=0, help="0 = PyTorch's default")
  p.add_argument("--profile_dir", default="", help="also write a JAX trace of one epoch")
  args = p.parse_args()
  try:
    import torch
  except ImportError:
    sys.exit("torch not installed (pip install torch, or the project's bench extra)")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  torch.manual_seed(0)
  data = load_mmrec(args.data)
  print(f"data: {data.name}: {data.n_users} users x {data.n_items} items, "
        f"{len(data.train)} train pairs, features "
        f"{ {m: int(f.shape[1]) for m, f in data.features.items()} }")
  print(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs visible")
  model = build_recommender("mmgcn_mmrec", data, {}, nnx.Rngs(0))
  net = torch_model(model, data.features)
  with torch.no_grad():
    t_nodes = net().numpy()
  users, items = jax.jit(lambda m, f: m.encode(m.project(f)))(model, data.features)
  j_nodes = np.concatenate([_np(users), _np(items)])
  diff = float(np.abs(t_nodes - j_nodes).max())
  print(f"forward check: max |torch - jax| over all node vectors = {diff:.2e} "
        f"(scale {np.abs(j_nodes).max():.2e})")
  if not diff <= 1e-4 * max(1.0, float(np.abs(j_nodes).max())):
    sys.exit("the PyTorch and JAX forwards differ: not the same architecture")
  n_params_t = sum(x.numel() for x in net.parameters())
  n_params_j = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"parameters: torch {n_params_t:,}, jax {n_params_j:,}")

  trainer = RecsysTrainer(model, data, {"log": False, "reg_weight": args.reg_weight,
                                        "learning_rate": LR, "batch_size": BATCH,
                                        "seed": SEED}, mesh=make_mesh())
  t_epoch = torch_epoch_fn(net, data, args.reg_weight)
  print(f"load average before: {_load()}")
  t0 = time.perf_counter()
  j_loss0 = trainer.train_epoch(0)["loss"]
  j_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  t_loss0 = t_epoch(0)
  t_first = time.perf_counter() - t0
  print(f"warm-up epoch 0: jax {j_first:.2f} s (compile included), loss {j_loss0:.5f}; "
        f"torch {t_first:.2f} s, loss {t_loss0:.5f}")
  times = {"jax": [], "torch": []}
  cpu = {"jax": [], "torch": []}
  for r in range(1, args.rounds + 1):
    for name, fn in (("jax", lambda e: trainer.train_epoch(e)["loss"]), ("torch", t_epoch)):
      t0, c0 = time.perf_counter(), time.process_time()
      loss = fn(r)
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
      print(f"round {r}: {name:5s} epoch {times[name][-1]:.3f} s (CPU {cpu[name][-1]:.2f} s), "
            f"loss {loss:.5f}, load {_load()}", flush=True)
  print(f"load average after: {_load()}")
  med = {k: float(np.median(v)) for k, v in times.items()}
  best = {k: float(np.min(v)) for k, v in times.items()}
  print("| side | epoch s (median) | epoch s (min) | epoch CPU s (median) |")
  print("|---|---|---|---|")
  for k in ("jax", "torch"):
    print(f"| {k} | {med[k]:.3f} | {best[k]:.3f} | {float(np.median(cpu[k])):.2f} |")
  ratio = med["torch"] / med["jax"]
  print(f"PyTorch / JAX epoch time (medians): {ratio:.2f}x (min/min {best['torch'] / best['jax']:.2f}x); "
        f"goal >= 10x: {'met' if ratio >= 10 else 'NOT met'}")
  if args.profile_dir:
    jax.profiler.start_trace(args.profile_dir)
    trainer.train_epoch(args.rounds + 1)
    jax.profiler.stop_trace()
    print(f"JAX trace of one epoch in {args.profile_dir}")


if __name__ == "__main__":
  main()
