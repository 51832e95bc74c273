"""experiments.longtail_table: grouping by (IR, method), mean ± std over seeds, Markdown."""
import json
import os

import numpy as np
import pytest

from uatmc_jax.core.errors import ConfigError
from uatmc_jax.longtail import table as lt

COUNTS = [50, 20, 5]  # many / medium / few; tail = rarest 30% of 3 classes = class 2


def _block(per_class):
  pc = np.asarray(per_class, float)
  return {"per_class": list(pc), "overall": float(pc.mean()), "balanced": float(pc.mean()),
          "many": float(pc[0]), "medium": float(pc[1]), "few": float(pc[2]),
          "tail": float(pc[2]), "seconds": 1.0}


def _write_run(root, name, *, ir, method, seed, clean, pgd, evals=None, method_spec=None,
               eval_n_test=None):
  d = os.path.join(root, name)
  os.makedirs(d)
  run = {"imbalance_ratio": ir, "method": method, "seed": seed, "class_counts": COUNTS,
         "class_names": ["a", "b", "c"], "clean": _block(clean), "pgd20": _block(pgd)}
  if method_spec is not None:
    run["method_spec"] = method_spec
  with open(os.path.join(d, "results.json"), "w") as f:
    json.dump(run, f)
  if evals is not None:
    blocks = {k: _block(v) for k, v in evals.items()}
    for k, n in (eval_n_test or {}).items():
      blocks[k]["n_test"] = n
    with open(os.path.join(d, "eval_results.json"), "w") as f:
      json.dump({**blocks, "settings": {"n_test": 3}}, f)
  return d


def test_aggregate_mean_std_over_seeds_and_markdown(tmp_path):
  root = str(tmp_path)
  _write_run(root, "ir100_mcat_s0", ir=100.0, method="mcat", seed=0, clean=[.9, .5, .1],
             pgd=[.6, .2, .0], evals={"cw": [.5, .2, .0], "autoattack_apgd": [.4, .1, .0]})
  _write_run(root, "ir100_mcat_s1", ir=100.0, method="mcat", seed=1, clean=[.7, .3, .3],
             pgd=[.4, .2, .2], evals={"cw": [.3, .2, .2]})  # no AA for seed 1
  _write_run(root, "ir10_pgd_at_s0", ir=10.0, method="pgd_at", seed=0, clean=[.8, .6, .4],
             pgd=[.5, .3, .1])
  _write_run(root, "ir10_at_bsl_s0", ir=10.0, method="at_bsl", seed=0, clean=[.8, .6, .4],
             pgd=[.5, .3, .1])
  runs = [lt.load_run(d) for d in lt.expand_workdirs([os.path.join(root, "ir*")])]
  agg = lt.aggregate(runs)
  # IR descending, then pgd_at before at_bsl (METHOD_ORDER, not alphabetical).
  assert list(agg) == [(100.0, "mcat"), (10.0, "pgd_at"), (10.0, "at_bsl")]
  a = agg[(100.0, "mcat")]
  assert a["seeds"] == [0, 1]
  np.testing.assert_allclose(a["clean"]["tail"]["mean"], 0.2)
  # Sample std (ddof 1): |0.1 - 0.3| / sqrt(2), numpy's std(ddof=1).
  np.testing.assert_allclose(a["clean"]["tail"]["std"], np.std([0.1, 0.3], ddof=1))
  np.testing.assert_allclose(a["clean"]["tail"]["std"], 0.2 / np.sqrt(2))
  np.testing.assert_allclose(a["pgd20"]["overall"]["mean"], (0.8 / 3 + 0.8 / 3) / 2)
  np.testing.assert_allclose(a["cw"]["per_class"], [.4, .2, .1])
  assert a["autoattack_apgd"]["n"] == 1 and a["autoattack_apgd"]["tail"]["std"] is None
  assert "cw" not in agg[(10.0, "pgd_at")]
  md = lt.markdown(agg)
  # Compact row: clean tail 20.0 ± 14.1; AA present only for IR 100 (n/a for IR 10).
  row100 = next(l for l in md.splitlines() if l.startswith("| 100 | mcat | 2 |"))
  assert "20.0 ± 14.1" in row100
  assert "mean ± sample std (ddof 1) over 1–2 seeds" in md
  row10 = next(l for l in md.splitlines() if l.startswith("| 10 | pgd_at | 1 |"))
  assert row10.count("n/a") == 6  # CW and AA-apgd x overall/balanced/tail
  # One seed: the mean alone (clean overall 60.0), no "± 0.0" posing as a spread.
  assert "| 60.0 |" in row10 and "±" not in row10, row10
  aa_row = next(l for l in md.splitlines() if l.startswith("| 100 | mcat | AA-apgd |"))
  assert "±" not in aa_row and "| 16.7 |" in aa_row, aa_row
  assert "| 100 | mcat | AA-apgd | 1 | 3 |" in md  # eval_results' settings.n_test
  plot = tmp_path / "pc.png"
  assert lt.per_class_plot(str(plot), agg) == {100.0: "autoattack_apgd", 10.0: "pgd20"}
  assert plot.stat().st_size > 0


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(ConfigError, match="no directory matches"):
    lt.expand_workdirs([str(tmp_path / "nothing*")])
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ConfigError, match="results.json: not found"):
    lt.load_run(str(tmp_path / "empty"))
  root = str(tmp_path)
  a = _write_run(root, "a", ir=100.0, method="mcat", seed=0, clean=[1, 0, 0], pgd=[1, 0, 0])
  b = _write_run(root, "b", ir=100.0, method="mcat", seed=0, clean=[1, 0, 0], pgd=[1, 0, 0])
  with pytest.raises(ConfigError, match="seed listed twice"):
    lt.aggregate([lt.load_run(a), lt.load_run(b)])


def test_ablations_are_their_own_rows_and_test_sizes_are_shown(tmp_path):
  """MCAT with manifold_weight=0 / etf_weight=0 (recorded in method_spec, same name) must
  not be averaged with MCAT (nor rejected as a repeated seed); they follow their base."""
  import dataclasses
  from uatmc_jax.longtail import methods as longtail_methods
  root = str(tmp_path)
  spec = lambda **kw: dataclasses.asdict(longtail_methods.resolve_method("mcat", **kw))
  assert spec()["manifold_weight"] > 0 and spec()["etf_weight"] > 0
  _write_run(root, "ir10_mcat_noman_s0", ir=10.0, method="mcat", seed=0, clean=[.9, .5, .1],
             pgd=[.6, .2, .0], method_spec=spec(manifold_weight=0.0))
  _write_run(root, "ir10_mcat_s0", ir=10.0, method="mcat", seed=0, clean=[.7, .3, .3],
             pgd=[.4, .2, .2], method_spec=spec(),
             evals={"cw": [.3, .2, .1], "autoattack": [.3, .1, .1]},
             eval_n_test={"cw": 300, "autoattack": 30})
  _write_run(root, "ir10_mcat_noetf_s0", ir=10.0, method="mcat", seed=0, clean=[.8, .4, .2],
             pgd=[.5, .2, .1], method_spec=spec(etf_weight=0.0))
  _write_run(root, "ir10_pgd_at_s0", ir=10.0, method="pgd_at", seed=0, clean=[.8, .6, .4],
             pgd=[.5, .3, .1], method_spec=dataclasses.asdict(
                 longtail_methods.resolve_method("pgd_at")))
  runs = [lt.load_run(d) for d in lt.expand_workdirs([os.path.join(root, "ir*")])]
  agg = lt.aggregate(runs)
  assert list(agg) == [(10.0, "pgd_at"), (10.0, "mcat"), (10.0, "mcat (etf_weight=0)"),
                       (10.0, "mcat (manifold_weight=0)")]
  np.testing.assert_allclose(agg[(10.0, "mcat (manifold_weight=0)")]["clean"]["tail"]["mean"],
                             0.1)
  np.testing.assert_allclose(agg[(10.0, "mcat")]["clean"]["tail"]["mean"], 0.3)
  md = lt.markdown(agg)
  assert "| 10 | mcat | AA | 1 | 30 |" in md and "| 10 | mcat | CW | 1 | 300 |" in md
  assert "| 10 | mcat (manifold_weight=0) | clean | 1 | ? |" in md  # no n_test recorded
  assert "| 10 | mcat | clean | 1 | ? |" in md


def test_launcher_names_unfinished_runs_in_one_line_and_can_skip_them(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _write_run(str(tmp_path), "ir10_mcat_s1", ir=10.0, method="mcat", seed=1,
             clean=[1, 0, 0], pgd=[1, 0, 0])
  os.makedirs(tmp_path / "ir10_mcat_s2")  # still training: no results.json yet
  cmd = [sys.executable, "-m", "experiments.longtail_table",
         f"--workdirs={tmp_path}/ir10_*"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert out.returncode == 2, out.stderr
  assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
  assert "ir10_mcat_s2" in lines[0] and "--skip_unfinished" in lines[0], lines
  ok = subprocess.run(cmd + ["--skip_unfinished"], cwd=root, capture_output=True, text=True,
                      timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert "ir10_mcat_s2" in ok.stderr and "| 10 | mcat |" in ok.stdout, ok.stdout
