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

``launch.run`` also parses the flags itself, so a bad ``--config`` key or value (which
``config_flags`` reports while flags are parsed, before ``main``) exits 2 with one line
too. At the default verbosity, library INFO logging is kept off the terminal
(:func:`quiet_libraries`); ``--verbosity=0`` shows it.
"""
from __future__ import annotations

import logging as py_logging
import os
import re
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


# Environment variables that mark one process of a multi-process job, with the size they
# announce (None: present means multi-process). JAX's cluster detection
# (``jax.distributed.initialize()`` without arguments) understands every one of them.
_MULTIPROCESS_ENV = (("SLURM_NTASKS", int), ("OMPI_COMM_WORLD_SIZE", int),
                     ("PMI_SIZE", int), ("JAX_COORDINATOR_ADDRESS", None),
                     ("TPU_WORKER_HOSTNAMES", lambda v: len([h for h in v.split(",") if h])),
                     ("MEGASCALE_COORDINATOR_ADDRESS", None))


def detect_multiprocess_env(environ=None) -> str | None:
  """The environment variable that announces a multi-process job, or None.

  ``SLURM_NTASKS`` / ``OMPI_COMM_WORLD_SIZE`` / ``PMI_SIZE`` above 1, a
  ``TPU_WORKER_HOSTNAMES`` list of more than one host, or a coordinator address
  (``JAX_COORDINATOR_ADDRESS``, ``MEGASCALE_COORDINATOR_ADDRESS``).
  """
  environ = os.environ if environ is None else environ
  for name, size in _MULTIPROCESS_ENV:
    value = environ.get(name)
    if not value:
      continue
    if size is None:
      return f"{name}={value}"
    try:
      n = size(value)
    except ValueError:
      continue
    if n > 1:
      return f"{name}={value}"
  return None


def _start_distributed() -> None:
  """``jax.distributed`` from the flags, or from the environment of a multi-process job.

  A job started by SLURM / Open MPI / a TPU pod without ``--coordinator_address`` would
  otherwise run N independent copies writing one workdir: it is started with JAX's
  cluster detection, and when that fails the launch stops with a ConfigError saying
  which flags to pass.
  """
  coordinator = FLAGS.coordinator_address
  if not coordinator and not (FLAGS.num_processes and FLAGS.num_processes > 1):
    found = detect_multiprocess_env()
    if found is not None:
      try:
        mesh_lib.maybe_initialize_distributed("auto")
      except Exception as e:  # JAX raises RuntimeError/ValueError for an unknown cluster
        raise errors.ConfigError(
            f"this is one process of a multi-process job ({found}) but jax.distributed "
            f"could not start from the environment ({type(e).__name__}: {e}); pass "
            "--coordinator_address=host:port --num_processes=N --process_id=i (or "
            "--coordinator_address=auto on Cloud TPU / SLURM / Open MPI)") from e
      return
  mesh_lib.maybe_initialize_distributed(coordinator, FLAGS.num_processes, FLAGS.process_id)


def setup() -> None:
  """Initialises the runtime from flags: library logging quietened (unless
  ``--verbosity``), fake CPU devices, then ``jax.distributed`` (from the flags or a
  multi-process environment)."""
  quiet_libraries()
  if FLAGS.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  cache_dir = compilation_cache_dir(FLAGS.compilation_cache_dir)
  if cache_dir:
    # The MMGCN promotion attack compiles one program per neighbourhood bucket and
    # attacker (~25 s each, minutes per run on CPU): a later run reads them back.
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  _start_distributed()
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
  if not FLAGS.workdir:
    raise errors.ConfigError(f"--workdir is required ({workdir_role})")
  if config.value is None:
    raise errors.ConfigError(f"--config is required, e.g. --config={example}")
  return config.value, workdir_path(FLAGS.workdir)


def is_remote_path(path: str) -> bool:
  """True for a ``scheme://`` location (``gs://bucket/run``), which stays as given."""
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)) is not None


def workdir_path(path: str) -> str:
  """``--workdir`` as the run uses it: remote ``scheme://`` paths unchanged (an
  ``os.path.abspath`` would turn ``gs://b/run`` into ``<cwd>/gs:/b/run``), local paths
  with ``~`` expanded."""
  if is_remote_path(path):
    return str(path)
  return os.path.expanduser(str(path))


def quiet_libraries() -> None:
  """Keeps library INFO lines (JAX's backend probing, orbax's handler registry and
  checkpoint writes) off the terminal unless ``--verbosity`` was given.

  The project's own progress lines, tables and error lines are printed, not logged, so
  they are unaffected; ``--verbosity=0`` (absl INFO) shows everything again.
  """
  if "verbosity" in FLAGS and FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  for name in ("jax", "jax._src.xla_bridge", "orbax", "absl"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def _innermost(e: BaseException) -> BaseException:
  """The first exception of a chain (``raise ... from`` / raised while handling)."""
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    nxt = e.__cause__ or e.__context__
    if nxt is None:
      break
    e = nxt
  return e


def _config_module_defaults(config_path: str) -> dict:
  """``DEFAULTS`` of an ``experiments/configs`` file (for the expected type of a key)."""
  import importlib.util
  try:
    spec = importlib.util.spec_from_file_location("_launch_config_defaults", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(getattr(module, "DEFAULTS", {}) or {})
  except Exception:  # the message is still useful without the types
    return {}


def config_error_line(flag_value: str, error: BaseException) -> str:
  """One line for a ``--config`` that could not be built.

  A ConfigError keeps its message (it names the key and the valid ones); any other
  error of the config file (``int('abc')``) names the ``k=v`` arguments whose value
  appears in the error, with the type that key's default has.
  """
  root = _innermost(error)
  if isinstance(root, errors.UatmcError):
    return f"error: {root}"
  path, _, arg = str(flag_value).partition(":")
  msg = str(root).strip().splitlines()[-1] if str(root).strip() else type(root).__name__
  culprits = []
  defaults = _config_module_defaults(path) if arg else {}
  for part in arg.split(","):
    k, sep, v = part.partition("=")
    k, v = k.strip(), v.strip()
    if sep and v and (repr(v) in msg or repr(v.lower()) in msg or v in msg):
      default = defaults.get(k)
      kind = (f"; expected {type(default).__name__} like its default {default!r}"
              if default is not None else "")
      culprits.append(f"{k}={v!r}{kind}")
  where = f"config argument {' / '.join(culprits)}" if culprits else f"--config={flag_value}"
  return f"error: {where}: {type(root).__name__}: {msg}"


def parse_flags(argv):
  """absl flag parsing whose ``--config`` errors end the run with one line and exit 2.

  ``config_flags`` builds the config while flags are parsed, before ``main`` runs: a
  ConfigError of an unknown key (or a ValueError of a malformed value) would otherwise
  leave absl's usage text and a traceback with exit status 1.
  """
  try:
    return FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if "--config" in text.split(":", 1)[0] or isinstance(_innermost(e), errors.UatmcError):
      value = next((a.split("=", 1)[1] for a in argv[1:]
                    if a.startswith("--config=")), "")
      print(config_error_line(value, e), file=sys.stderr, flush=True)
      sys.exit(2)
    print(f"error: {text.splitlines()[0]}", file=sys.stderr, flush=True)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr, flush=True)
    sys.exit(2)


def run(main) -> None:
  """``app.run(main)``, but bad input exits 2 with one clear line on stderr."""

  def wrapped(argv):
    try:
      return main(argv)
    except errors.UatmcError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(wrapped, flags_parser=parse_flags)
