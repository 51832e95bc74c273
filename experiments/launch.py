"""What every experiment launcher shares: absl flags for multi-host runs and clean errors.

Usage in a launcher::

    from experiments import launch
    FLAGS = flags.FLAGS
    _CONFIG = config_flags.DEFINE_config_file("config")
    def main(argv):
      launch.setup()              # jax.distributed when asked, platform info
      ...
    if __name__ == "__main__":
      launch.run(main)            # turns library input errors into one clear line + exit 2
"""
from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from uatmc_jax.core import errors
from uatmc_jax.core.parallel import mesh as mesh_lib

flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-host runs; 'auto' lets JAX detect the "
                    "cluster (Cloud TPU pods, SLURM, Open MPI).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_integer("num_cpu_devices", None,
                     "Fake this many CPU devices (testing sharding on one machine).")
flags.DEFINE_string("compilation_cache_dir", None,
                    "Persistent XLA compilation cache: executables that took >= 1 s to "
                    "compile are stored here and reused by later runs with the same "
                    "programs (resumes, other seeds, other processes). Default: "
                    "$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/uatmc_jax/xla; "
                    "'' turns it off.")

FLAGS = flags.FLAGS


def define_config_flag(help_text: str) -> flags.FlagHolder:
  """``--config`` (a config file with ``:args``), defined once per process.

  Launchers are also imported as libraries (``experiments.uatmc`` calls the attack and
  training code, tests import several launchers); absl refuses a second definition of a
  flag, so later launchers share the first definition (same type, same semantics).
  """
  if "config" in FLAGS:
    return flags.FlagHolder(FLAGS, FLAGS["config"])
  return config_flags.DEFINE_config_file("config", None, help_text)


def setup() -> None:
  """Initialises the runtime from flags: fake CPU devices, then ``jax.distributed``."""
  if FLAGS.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  cache_dir = compilation_cache_dir(FLAGS.compilation_cache_dir)
  if cache_dir:
    # The MMGCN promotion attack compiles one program per neighbourhood bucket and
    # attacker (~25 s each, minutes per run on CPU): a later run reads them back.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  mesh_lib.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def compilation_cache_dir(flag_value: str | None) -> str:
  """The persistent compilation cache directory ('' = off) for a ``--compilation_cache_dir``."""
  if flag_value is not None:
    return os.path.expanduser(flag_value)
  env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if env is not None:
    return env
  return os.path.join(os.path.expanduser("~"), ".cache", "uatmc_jax", "xla")


def start(config: flags.FlagHolder, example: str,
          workdir_role: str = "checkpoints and results go there"):
  """Every launcher's first lines: runtime set-up, then the required flags checked.

  Args:
    config: the ``--config`` flag holder (from :func:`define_config_flag`).
    example: a working ``--config`` value, quoted in the error when it is missing.
    workdir_role: what ``--workdir`` is for, quoted in the error when it is missing.

  Returns:
    ``(config, workdir)``.
  """
  setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint write at INFO
  if not FLAGS.workdir:
    raise errors.ConfigError(f"--workdir is required ({workdir_role})")
  if config.value is None:
    raise errors.ConfigError(f"--config is required, e.g. --config={example}")
  return config.value, FLAGS.workdir


def run(main) -> None:
  """``app.run(main)``, but bad input exits 2 with one clear line on stderr."""

  def wrapped(argv):
    try:
      return main(argv)
    except errors.UatmcError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(wrapped)
