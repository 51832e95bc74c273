"""Two processes x 2 CPU devices (gloo collectives) == one process x 4 devices.

Starts ``tests/multihost_driver.py`` three times with ``sys.executable``: two processes
forming one ``jax.distributed`` run over localhost (process 0 is the coordinator),
and a single-process reference on 4 faked devices. Each runs a few steps of the
recommender trainer and of the long-tail trainer (tiny data and models; orbax
checkpoints written by both processes together) and writes its metrics; every number
must agree to 1e-5. The 2-process recommender runs also split their user/item tables
over a model axis: of 2 (mesh 2 x 2: data parallel across the processes) and of 4
(mesh 1 x 4: every table split across both processes); the reference is 4 x 1.
Then the attack launchers' cores on the same meshes: promotion attacks
(``attack_eval.run_attacks``: 7 targets split over the 4 devices) and the robust
evaluation (``evaluate.evaluate_classifier``: clean, PGD, CW, APGD batches split over
the 4 devices, after restoring the long-tail checkpoint replicated on the mesh); each
process must attack only its half and only process 0 writes the reports.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

DRIVER = pathlib.Path(__file__).with_name("multihost_driver.py")
ROOT = DRIVER.parent.parent
TIMEOUT_S = 300
MULTI_JOBS = ("recsys_m2", "recsys_m4", "longtail", "attack", "eval")  # 2 processes
REFERENCE = {"recsys_m2": "recsys_m1", "recsys_m4": "recsys_m1", "longtail": "longtail",
             "attack": "attack", "eval": "eval"}
PER_PROCESS = ("seconds", "user_table_shard_rows", "local_targets", "local_rows",
               "files_written")


def _free_port() -> int:
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("localhost", 0))
      return s.getsockname()[1]
  except OSError as e:  # pragma: no cover - sandboxes without loopback networking
    pytest.skip(f"cannot bind a localhost port for the jax.distributed coordinator: {e}")


def _start(out, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  # The driver sets its own device count; LLVM -O0 halves XLA's CPU compile time, which
  # dominates these tiny runs (the same flags in every process, so the same numerics).
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  log = open(out / f"log_{len(list(out.glob('log_*')))}.txt", "w")
  return subprocess.Popen([sys.executable, "-X", "faulthandler", str(DRIVER), "--out", str(out),
                           *args],
                          stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env), log


def _wait_all(procs, out):
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p, log in procs:
      if p.poll() is None:  # hung: SIGABRT makes faulthandler print every thread's stack
        p.send_signal(signal.SIGABRT)
        try:
          p.wait(timeout=20)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait()
      log.close()
  done = sorted(f.name for f in out.glob("*_p*.json"))
  logs = "\n".join(f"--- {f.name}\n{f.read_text()[-4000:]}" for f in sorted(out.glob("log_*")))
  logs = f"jobs finished: {done}\n{logs}"
  failed = [p.returncode for p, _ in procs if p.returncode != 0]
  assert not failed, f"driver exit codes {[p.returncode for p, _ in procs]}:\n{logs}"


def _flatten(tree, prefix=""):
  if isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
    tree = {str(i): v for i, v in enumerate(tree)}  # e.g. per-seed result blocks
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}/"))
    return out
  return {prefix.rstrip("/"): np.asarray(tree, np.float64)}


def _assert_close(got, want, what):
  g, w = _flatten(got), _flatten(want)
  assert g.keys() == w.keys(), what
  for k in w:
    np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-5, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs the 2-process job and the 1-process reference concurrently."""
  port = _free_port()
  multi = tmp_path_factory.mktemp("two_processes")
  single = tmp_path_factory.mktemp("one_process")
  procs = [_start(multi, "--jobs", "recsys:2,recsys:4,longtail,attack,eval",
                  "--local_devices", "2",
                  "--num_processes", "2", "--process_id", str(i),
                  "--coordinator", f"localhost:{port}")
           for i in range(2)]
  procs.append(_start(single, "--jobs", "recsys:1,longtail,attack,eval", "--local_devices", "4",
                      "--num_processes", "1"))
  _wait_all(procs, multi)
  read = lambda d, job, p: json.loads((d / f"{job}_p{p}.json").read_text())
  return {job: {"p0": read(multi, job, 0), "p1": read(multi, job, 1),
                "ref": read(single, REFERENCE[job], 0)} for job in MULTI_JOBS}


def _metrics(result):
  return {k: v for k, v in result.items() if k not in PER_PROCESS}


@pytest.mark.parametrize("job", MULTI_JOBS)
def test_two_processes_equal_one_process_on_four_devices(runs, job):
  r = runs[job]
  _assert_close(_metrics(r["p1"]), _metrics(r["p0"]), f"{job}: process 1 vs process 0")
  _assert_close(_metrics(r["p0"]), _metrics(r["ref"]), f"{job}: 2 processes vs 1 process")


def test_recommender_tables_were_split_over_the_model_axis(runs):
  n_users = 32
  assert runs["recsys_m2"]["ref"]["user_table_shard_rows"] == [n_users]
  assert runs["recsys_m2"]["p0"]["user_table_shard_rows"] == [n_users // 2]
  # model axis 4 spans both processes: each process holds only half of the table
  for p in ("p0", "p1"):
    assert runs["recsys_m4"][p]["user_table_shard_rows"] == [n_users // 4]


@pytest.mark.parametrize("job", ["recsys_m2", "recsys_m4"])
def test_trainer_makes_no_cross_process_host_gathers(runs, job):
  """No jax.device_put of a host value onto devices of both processes during the
  recommender trainer's start-up, training and evaluation (each such put all-gathers
  the value across processes to compare it)."""
  for p in ("p0", "p1"):
    assert runs[job][p]["host_device_put_calls"] == 0, runs[job][p]
    assert runs[job][p]["host_device_put_bytes"] == 0


def test_runs_trained_and_evaluated_something(runs):
  rec = runs["recsys_m2"]["ref"]
  assert len(rec["losses"]) == 2 and rec["losses"][1] < rec["losses"][0]
  assert 0 < rec["valid"]["recall@20"] <= 1
  lt = runs["longtail"]["ref"]
  assert np.isfinite(lt["last_epoch_metrics"]["loss"])
  assert len(lt["clean"]["per_class"]) == 3


def test_attack_and_eval_processes_did_only_their_share(runs):
  at = runs["attack"]
  # one chunk of 8 targets (7 + 1 padding) over 4 devices: 2 per device
  assert at["ref"]["chunk_targets"] == 8 and at["ref"]["local_targets"] == 8
  assert at["p0"]["local_targets"] == at["p1"]["local_targets"] == 4
  ev = runs["eval"]
  assert ev["ref"]["local_rows"] > 0 and ev["ref"]["local_rows"] % 8 == 0
  assert ev["p0"]["local_rows"] == ev["p1"]["local_rows"] == ev["ref"]["local_rows"] // 2


def test_reports_written_by_process_zero_only(runs):
  assert runs["attack"]["p0"]["files_written"] == [
      "attack_cosines.png", "attack_results.json", "attack_results.md"]
  assert runs["eval"]["p0"]["files_written"] == [
      "eval_results.json", "eval_results.md", "per_class_robust_accuracy.png"]
  assert runs["attack"]["p1"]["files_written"] == runs["eval"]["p1"]["files_written"] == []


def test_attacks_did_something_and_checkpoint_restored_on_the_mesh(runs):
  per_target = runs["attack"]["ref"]["per_target"]["pgd_aligned@1.0"][0]
  assert np.any(np.asarray(per_target["rank_after"]) != np.asarray(per_target["rank_before"]))
  assert len(per_target["targets"]) == 7
  res = runs["eval"]["ref"]["results"]
  assert 0 < res["clean"]["overall"] < 1
  assert min(res[a]["overall"] for a in ("pgd20", "autoattack_apgd")) < res["clean"]["overall"]
  for p in ("p0", "p1", "ref"):
    np.testing.assert_allclose(runs["eval"][p]["restored_params_sum_sq"],
                               runs["longtail"][p]["params_sum_sq"], rtol=1e-6)
