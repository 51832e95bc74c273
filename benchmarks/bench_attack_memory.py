"""Memory per device of the promotion attack's context and of MMGCN's propagation
off CPU, from ``compiled.memory_analysis()`` at abstract shapes (docs/scale.md).

  python benchmarks/bench_attack_memory.py

Nothing runs at these sizes: the programs are lowered and compiled for 8 fake CPU
devices with ``jax.ShapeDtypeStruct`` inputs. Prints MiB of temporaries / arguments /
outputs for TikTok (9,308 x 6,710), Baby (19,445 x 7,050) and 1M users x 100k items
(40 % anchors, K = 50), and the chunked propagation's temporaries at 100M edges.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402

from uatmc_jax.core.parallel import mesh as mesh_lib  # noqa: E402
from uatmc_jax.recsys.attacks import context  # noqa: E402
from uatmc_jax.recsys.models import graph_propagation  # noqa: E402

MIB = 2 ** 20
SIZES = (("TikTok", 9_308, 6_710, 192, None), ("Baby", 19_445, 7_050, 128, None),
         ("1M x 100k", 1_000_000, 100_000, 192, 256))


def main() -> None:
  spec = jax.ShapeDtypeStruct
  print("data, devices: temp / args / out MiB per device (top-k context layout); "
        "dense layout = 3 (anchors x items) float32 matrices")
  for name, n_users, n_items, d, degree in SIZES:
    anchors = int(0.4 * n_users)
    dense = 3 * anchors * n_items * 4 / MIB
    for mesh in (None, mesh_lib.make_mesh(8, 1)):
      program = context.topk_context_program(k=50, width=0, mesh=mesh)
      a = program.lower(spec((anchors, d), jnp.float32), spec((n_items, d), jnp.float32),
                        None if degree is None else spec((anchors, degree), jnp.int32)
                        ).compile().memory_analysis()
      print(f"{name}, {1 if mesh is None else mesh.size}: {a.temp_size_in_bytes / MIB:.1f} / "
            f"{a.argument_size_in_bytes / MIB:.1f} / {a.output_size_in_bytes / MIB:.1f}"
            f"   (dense layout {dense:,.0f} MiB)")
  edges, nodes = 100_000_000, 2_000_000
  a = jax.jit(graph_propagation.chunked_propagate).lower(
      spec((edges,), jnp.float32), spec((edges,), jnp.int32), spec((edges,), jnp.int32),
      spec((nodes, 192), jnp.float32)).compile().memory_analysis()
  print(f"chunked propagation, {edges:,} edges x 192 columns: temporaries "
        f"{a.temp_size_in_bytes / MIB:.0f} MiB, output {a.output_size_in_bytes / MIB:.0f} MiB "
        f"(a per-edge gather would need {edges * 192 * 4 / MIB:,.0f} MiB)")


if __name__ == "__main__":
  main()
