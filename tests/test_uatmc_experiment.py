"""End-to-end: experiments.uatmc on a tiny synthetic folder: result keys and invariants."""
import json
import os

import numpy as np
import pytest

from uatmc_jax.recsys.data.synthetic import SyntheticConfig, write_synthetic

DEFENCE_KEYS = ("vanilla", "apr", "amr", "uat_mc_no_align", "uat_mc")


@pytest.mark.slow
def test_uatmc_experiment_end_to_end_and_resume(tmp_path):
  from uatmc_jax.recsys import attack_stage
  from uatmc_jax.recsys import experiment as uatmc
  from uatmc_jax.recsys.attacks import protocol
  from experiments.configs import uatmc as uatmc_config
  from uatmc_jax.core.errors import ConfigError

  folder = write_synthetic(tmp_path / "data", SyntheticConfig(
      n_users=120, n_items=60, mean_interactions=10, name="tiny"))
  cfg = uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1")
  workdir = str(tmp_path / "run")
  results = uatmc.run_experiment(cfg, workdir)
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  for res in (results, on_disk):
    assert set(res["defences"]) == set(DEFENCE_KEYS)
    for block in res["defences"].values():
      for metric in ("recall@20", "ndcg@10", "ndcg@20"):
        assert set(block[metric]) == {"mean", "std"}
      assert set(block["attacks"]) == {"fgsm", "pgd", "pgd_aligned"}
      for attack in block["attacks"].values():
        # Hit@K is named after the attack's K (attack_k=10), not a fixed 50.
        assert "hit@50_after" not in attack
        for key in ("hit@10_before", "hit@10_after", "avg_rank_change"):
          assert set(attack[key]) == {"mean", "std"}
          assert attack[key]["mean"] is not None
  assert results["hit_k"] == 10
  for name, block in results["defences"].items():
    for metric in ("recall@20", "ndcg@10", "ndcg@20"):
      assert 0 < block[metric]["mean"] <= 1, (name, metric)
    at = block["attacks"]
    # The clean hit rate is the model's, whichever attacker runs next.
    before = {a: at[a]["hit@10_before"]["mean"] for a in at}
    assert len(set(before.values())) == 1, (name, before)
    for a in at:
      assert 0 <= at[a]["hit@10_before"]["mean"] <= 1
      assert 0 <= at[a]["hit@10_after"]["mean"] <= 1
  # The seed's stored numbers are the ones aggregated (one seed: mean = value).
  stage = json.load(open(os.path.join(workdir, "seed_1", "vanilla",
                                      "attack_results_eps0.05.json")))
  np.testing.assert_allclose(results["defences"]["vanilla"]["attacks"]["pgd"]["hit@10_after"]
                             ["mean"], stage["pgd"]["hit@10_after"])
  # Per-target values behind the means (paired comparisons of attackers across targets).
  for a in ("pgd", "pgd_aligned"):
    assert len(stage[a]["per_target_hit@10_after"]) == 4
    np.testing.assert_allclose(np.mean(stage[a]["per_target_hit@10_after"]),
                               stage[a]["hit@10_after"], rtol=1e-6)
    corr = np.asarray(stage[a]["per_target_gain_correlation_after"], float)
    assert corr.shape == (4,) and np.all(np.isnan(corr) | (np.abs(corr) <= 1 + 1e-6))
  # The A.5 summary pools exactly those per-target values (one seed: no pooling across).
  for a in ("fgsm", "pgd", "pgd_aligned"):
    summary = results["mismatch"]["vanilla"][a]
    clean = np.asarray([np.nan if x is None else x for x in stage[a]["per_target_cosine_clean"]])
    clean = clean[np.isfinite(clean)]
    assert summary["targets"] == 4 and summary["targets_with_gradient"] == clean.size
    if clean.size:
      np.testing.assert_allclose(summary["cosine_clean_quantiles_10_50_90"],
                                 np.quantile(clean, [0.1, 0.5, 0.9]))
    assert summary["dominant_group_differs_share"]["mean"] == \
        stage[a]["dominant_group_differs_share"]
  # The targets (same ids for every attacker and defence of a seed) and their clean Hit.
  ids = stage["pgd"]["per_target_ids"]
  assert len(ids) == 4 == len(set(ids))
  apr_stage = json.load(open(os.path.join(workdir, "seed_1", "apr", "attack_results_eps0.05.json")))
  for a in ("fgsm", "pgd", "pgd_aligned"):
    assert stage[a]["per_target_ids"] == ids == apr_stage[a]["per_target_ids"]
    np.testing.assert_allclose(np.mean(stage[a]["per_target_hit@10_before"]),
                               stage[a]["hit@10_before"], rtol=1e-6)
  # Paired comparisons of this workdir pair by id (no position fallback); one seed has
  # no between-seed spread.
  from uatmc_jax.recsys import paired
  said = []
  pairs = paired.compare(paired.load_stages(workdir, 0.05), n_boot=200, say=said.append)
  assert said == [] and pairs["n_comparisons"]["defence_pairs"] == 12
  assert all(p["between_seed_std"] is None and "gain" in p for p in pairs["defence_pairs"])
  # Every defence says which seeds (none or some) ended at or below most-popular.
  assert all(isinstance(b["below_popularity"], list) for b in results["defences"].values())
  # Stage summaries on TensorBoard (step = seed) match the aggregated numbers.
  from uatmc_jax.core.metric_writer import read_scalars
  tb = read_scalars(os.path.join(workdir, "tensorboard", "uat_mc"))
  for a in ("fgsm", "pgd", "pgd_aligned"):
    (step, value), = tb[f"attack/eps0.05/hit@10_after/{a}"]
    assert step == 1
    np.testing.assert_allclose(
        value, results["defences"]["uat_mc"]["attacks"][a]["hit@10_after"]["mean"], rtol=1e-6)
  np.testing.assert_allclose(tb["clean/ndcg@10"][0][1],
                             results["defences"]["uat_mc"]["ndcg@10"]["mean"], rtol=1e-6)
  for name in ("results.md", "tradeoff.png", "mismatch.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  table = open(os.path.join(workdir, "results.md")).read()
  for row in ("Vanilla", "APR", "AMR", "UAT-MC w/o align", "UAT-MC"):
    assert f"| {row} |" in table
  assert "Hit@10 PGD" in table and "Hit@50" not in table
  assert "the values of 1 seed (no ±" in table and " ± " not in table.split("Cross-modal")[0]
  assert "Cross-modal gradient mismatch (A.5)" in table and "| Vanilla | PGD-aligned |" in table
  # The planted groups of the folder are used, and every output says so.
  planted = f"planted from {folder / 'user_groups.npy'}"
  assert results["protocol"]["groups"] == planted and planted in table
  assert json.load(open(os.path.join(workdir, "seed_1", "apr", "attack_results_eps0.05.json")))[
      "groups"] == planted
  # Every stage wrote its own result file; a rerun skips them all and reproduces the table.
  for name in DEFENCE_KEYS:
    stage = os.path.join(workdir, "seed_1", name)
    assert os.path.isfile(os.path.join(stage, "train_results.json"))
    assert os.path.isfile(os.path.join(stage, "attack_results_eps0.05.json"))
  again = uatmc.run_experiment(cfg, workdir)
  assert again["defences"] == results["defences"]
  # A restart with another attack budget recomputes the attacks instead of reusing the
  # saved ones (no stale numbers) and keeps the trained stages.
  wider = uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1,attack_epsilon=0.5")
  stage = os.path.join(workdir, "seed_1", "vanilla")
  trained_at = os.path.getmtime(os.path.join(stage, "train_results.json"))
  wide = uatmc.run_experiment(wider, workdir)
  saved = json.load(open(os.path.join(stage, "attack_results_eps0.5.json")))
  assert saved["settings"]["epsilon"] == 0.5
  assert os.path.getmtime(os.path.join(stage, "train_results.json")) == trained_at
  assert wide["defences"]["vanilla"]["recall@20"] == results["defences"]["vanilla"]["recall@20"]
  # ε = 0: no attacker moves any item, so after = before and the rank change is 0 for
  # every defence and attacker (the trained stages are reused).
  zero = uatmc.run_experiment(uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1,attack_epsilon=0.0"), workdir)
  for name, block in zero["defences"].items():
    for a, at in block["attacks"].items():
      assert at["hit@10_after"]["mean"] == at["hit@10_before"]["mean"], (name, a)
      assert at["avg_rank_change"]["mean"] == 0.0, (name, a)
      assert at["hit@10_before"] == results["defences"][name]["attacks"][a]["hit@10_before"]
  # With ε > 0 some attacker promotes some target on the undefended model.
  van = wide["defences"]["vanilla"]["attacks"]
  assert any(van[a]["avg_rank_change"]["mean"] < 0 for a in van)
  # Several budgets and the group-variant attackers in one run: the saved ε 0.05 / 0.5
  # results of fgsm / pgd / pgd_aligned are reused unchanged, only the group variants run.
  eps05 = os.path.join(stage, "attack_results_eps0.05.json")
  before_pgd = json.load(open(eps05))["pgd"]
  multi = uatmc.run_experiment(uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1,attack_epsilon=0.05+0.5,attackers=all"),
      workdir)
  assert multi["attackers"] == list(protocol.ALL_ATTACKERS)
  assert set(multi["by_epsilon"]) == {"0.05", "0.5"}
  assert json.load(open(eps05))["pgd"] == before_pgd
  for name in DEFENCE_KEYS:
    main, half = multi["defences"][name]["attacks"], multi["by_epsilon"]["0.5"][name]
    for a in ("fgsm", "pgd", "pgd_aligned"):
      assert main[a] == results["defences"][name]["attacks"][a], (name, a)
      assert half[a] == wide["defences"][name]["attacks"][a], (name, a)
    assert multi["by_epsilon"]["0.05"][name] == main
    for a in protocol.GROUP_ATTACKERS:  # run on the same model, anchors and targets
      for block in (main, half):
        assert block[a]["hit@10_before"] == block["pgd"]["hit@10_before"], (name, a)
        assert 0 <= block[a]["hit@10_after"]["mean"] <= 1
  # At ε 0.5 some group variant promotes some target on the undefended model.
  assert any(multi["by_epsilon"]["0.5"]["vanilla"][a]["avg_rank_change"]["mean"] < 0
             for a in protocol.GROUP_ATTACKERS)
  table = open(os.path.join(workdir, "results.md")).read()
  assert "Attack budget ε = 0.5" in table and "Hit@10 PGD-PCGrad groups" in table
  with pytest.raises(ConfigError, match="attackers.*unknown"):
    attack_stage.attackers_for(uatmc_config.get_config("attackers=pgd+pgd_typo"))
  with pytest.raises(ConfigError, match="distinct budgets"):
    uatmc_config.get_config("attack_epsilon=0.1+0.1")
  # A changed training config in the same workdir is refused with the field named.
  other_lr = uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1,lr=0.5")
  with pytest.raises(ConfigError, match="learning_rate"):
    uatmc.run_experiment(other_lr, workdir)


def test_vbpr_runs_only_what_needs_no_shared_space():
  from uatmc_jax.recsys import attack_stage
  from uatmc_jax.recsys.attacks import protocol
  from experiments.configs import uatmc as uatmc_config
  from uatmc_jax.core.errors import ConfigError
  with pytest.raises(ConfigError, match="uat_mc.*shared projected space"):
    attack_stage.attackers_for(uatmc_config.get_config("model=vbpr"))
  attackers, sweep = attack_stage.attackers_for(
      uatmc_config.get_config("model=vbpr,defences=vanilla+apr+uat_mc_no_align"))
  assert "pgd_aligned" not in attackers and "pgd_aligned" not in sweep
  mmgcn = uatmc_config.get_config("model=mmgcn")
  assert attack_stage.attackers_for(mmgcn)[0] == protocol.ATTACKERS
  # MMRec's MMGCN: no shared space either, and the graph models' UAT-MC preset.
  with pytest.raises(ConfigError, match="uat_mc.*shared projected space"):
    attack_stage.attackers_for(uatmc_config.get_config("model=mmgcn_mmrec"))
  mmrec = uatmc_config.get_config("model=mmgcn_mmrec,defences=vanilla+uat_mc_no_align")
  assert "pgd_aligned" not in attack_stage.attackers_for(mmrec)[0]
  assert mmrec.uat_mc["defence_preset"] == "mmgcn_baby"
  assert uatmc_config.get_config("model=vbpr_mlp").uat_mc["defence_preset"] == "vbpr_baby"


# ----------------------------------------------------------------------------------
# Aggregation over two seeds, on hand-built stage results (report.aggregate /
# report.mismatch_summary against numpy).


def _attack(before, after, rank, cos_clean, cos_after, corr, share, share_after):
  return {"hit@50_before": before, "hit@50_after": after, "avg_rank_change": rank,
          "per_target_cosine_clean": cos_clean, "per_target_cosine_after": cos_after,
          "per_target_gain_correlation_after": corr, "dominant_group_differs_share": share,
          "dominant_group_differs_share_after": share_after}


def _wide(before, after, rank, n):
  """A further budget's attack result (only the aggregated numbers matter)."""
  return _attack(before, after, rank, [0.0] * n, [0.0] * n, [0.0] * n, 0, 0)


def _two_seed_inputs():
  def stage(ndcg, seconds, below, atk, atk_wide):
    verdict = {"metric": "recall@20", "model": 0.1, "most_popular": 0.2} if below else None
    return {"train": {"test": {"recall@20": 2 * ndcg, "ndcg@10": ndcg, "ndcg@20": ndcg + 0.01},
                      "train_seconds": seconds, "below_popularity": verdict},
            "attacks": atk, "attacks_by_epsilon": {0.05: atk, 0.2: atk_wide}}

  nan = float("nan")
  per_seed = {
      1: {"vanilla": stage(0.10, 5.0, False,
                           {"fgsm": _attack(0.1, 0.3, -4.0, [0.5, None, -0.2], [0.1, 0.2, 0.3],
                                            [0.9, nan, 0.1], 0.5, 0.25),
                            "pgd": _attack(0.1, 0.5, -8.0, [0.4, 0.1, 0.0], [0.0, 0.0, 1.0],
                                           [0.2, 0.3, 0.4], 0.0, 1.0)},
                           {"fgsm": _wide(0.1, 0.6, -9.0, 3),
                            "pgd": _wide(0.1, 0.9, -20.0, 3)}),
          "uat_mc": stage(0.09, 7.0, True,
                          {"fgsm": _attack(0.1, 0.2, -1.0, [0.9, 0.8, 0.7], [0.6] * 3, [0.5] * 3,
                                           0.1, 0.1),
                           "pgd": _attack(0.1, 0.2, -2.0, [0.9] * 3, [0.9] * 3, [0.5] * 3,
                                          0.1, 0.1)},
                          {"fgsm": _wide(0.1, 0.3, -3.0, 3),
                           "pgd": _wide(0.1, 0.4, -5.0, 3)})},
      2: {"vanilla": stage(0.30, 9.0, False,
                           {"fgsm": _attack(0.2, 0.6, -6.0, [-0.9, 0.3], [0.4, -0.4], [0.7, 0.6],
                                            1.0, 0.75),
                            "pgd": _attack(0.2, 0.8, -12.0, [0.2, 0.6], [0.5, 0.5], [nan, nan],
                                           0.5, 0.0)},
                           {"fgsm": _wide(0.2, 0.7, -10.0, 2),
                            "pgd": _wide(0.2, 1.0, -30.0, 2)}),
          "uat_mc": stage(0.27, 11.0, True,
                          {"fgsm": _attack(0.2, 0.4, -2.0, [0.1, 0.2], [0.3] * 2, [0.1] * 2,
                                           0.3, 0.2),
                           "pgd": _attack(0.2, 0.5, -3.0, [0.3] * 2, [0.3] * 2, [0.1] * 2,
                                          0.2, 0.2)},
                          {"fgsm": _wide(0.2, 0.5, -4.0, 2),
                           "pgd": _wide(0.2, 0.6, -6.0, 2)})},
  }
  sweep = {1: {1.0: {"train": {"test": {"ndcg@10": 0.2}, "below_popularity": None},
                     "attacks": {"pgd": {"hit@50_after": 0.4}}},
               10.0: {"train": {"test": {"ndcg@10": 0.1}, "below_popularity": {"model": 0.1}},
                      "attacks": {"pgd": {"hit@50_after": 0.2}}}}}
  return per_seed, sweep


def test_aggregate_two_seeds_against_numpy():
  import types
  from uatmc_jax.recsys import report
  per_seed, sweep = _two_seed_inputs()
  cfg = types.SimpleNamespace(attack={"k": 50, "epsilon": 0.05, "epsilons": [0.05, 0.2]},
                              sweep="adv_weight")
  res = report.aggregate(cfg, per_seed, sweep, ("fgsm", "pgd"), ("pgd",))

  def ms(values):
    v = np.asarray(values, float)
    return {"mean": v.mean(), "std": v.std(ddof=1)}

  def close(got, values):
    want = ms(values)
    np.testing.assert_allclose([got["mean"], got["std"]], [want["mean"], want["std"]],
                               rtol=1e-12, atol=1e-15)

  van, uat = res["defences"]["vanilla"], res["defences"]["uat_mc"]
  close(van["ndcg@10"], [0.10, 0.30])
  np.testing.assert_allclose(van["ndcg@10"]["std"], 0.2 / np.sqrt(2))  # ddof 1, not 0.1
  close(van["recall@20"], [0.20, 0.60])
  close(uat["ndcg@20"], [0.10, 0.28])
  close(van["train_seconds"], [5.0, 9.0])
  close(van["attacks"]["pgd"]["hit@50_after"], [0.5, 0.8])
  close(van["attacks"]["fgsm"]["avg_rank_change"], [-4.0, -6.0])
  close(uat["attacks"]["pgd"]["hit@50_before"], [0.1, 0.2])
  close(res["by_epsilon"]["0.2"]["vanilla"]["pgd"]["hit@50_after"], [0.9, 1.0])
  close(res["by_epsilon"]["0.2"]["uat_mc"]["fgsm"]["avg_rank_change"], [-3.0, -4.0])
  assert res["by_epsilon"]["0.05"]["uat_mc"]["pgd"] == uat["attacks"]["pgd"]
  assert van["per_seed"]["2"] == {"ndcg@10": 0.30, "fgsm_hit@50_after": 0.6,
                                  "pgd_hit@50_after": 0.8}
  np.testing.assert_allclose(res["relative_ndcg@10_drop"]["uat_mc"], (0.2 - 0.18) / 0.2)
  assert van["below_popularity"] == [] and uat["below_popularity"] == [1, 2]
  assert res["sweep"]["below_popularity"] == [{"seed": 1, "value": 10.0}]
  assert [p["value"] for p in res["sweep"]["points"]] == [1.0, 10.0]
  # A.5 summary: per-target values pooled over both seeds (None / NaN dropped).
  mm = res["mismatch"]["vanilla"]["fgsm"]
  clean = np.array([0.5, -0.2, -0.9, 0.3])
  assert (mm["targets"], mm["targets_with_gradient"]) == (5, 4)
  np.testing.assert_allclose(mm["cosine_clean_quantiles_10_50_90"],
                             np.quantile(clean, [0.1, 0.5, 0.9]))
  np.testing.assert_allclose(mm["cosine_after_median"], np.median([0.1, 0.2, 0.3, 0.4, -0.4]))
  np.testing.assert_allclose(mm["gain_correlation_after_median"],
                             np.median([0.9, 0.1, 0.7, 0.6]))
  close(mm["dominant_group_differs_share"], [0.5, 1.0])
  close(mm["dominant_group_differs_share_after"], [0.25, 0.75])
  pg = res["mismatch"]["vanilla"]["pgd"]
  np.testing.assert_allclose(pg["gain_correlation_after_median"], np.median([0.2, 0.3, 0.4]))
  np.testing.assert_allclose(pg["cosine_clean_quantiles_10_50_90"],
                             np.quantile([0.4, 0.1, 0.0, 0.2, 0.6], [0.1, 0.5, 0.9]))
  # The Markdown carries the below-popularity warning above the table.
  text = report.markdown(res)
  assert text.index("below the most-popular baseline") < text.index("| Defence |")
  assert "UAT-MC (seeds 1, 2)" in text and "adv_weight=10 (seed 1)" in text


# ----------------------------------------------------------------------------------
# A collapsed model is flagged; stage summaries land on TensorBoard.


@pytest.mark.slow
def test_collapsed_model_flagged_and_stage_summaries(tmp_path):
  from uatmc_jax.core.metric_writer import read_scalars
  from uatmc_jax.recsys import experiment as uatmc
  from experiments.configs import uatmc as uatmc_config

  folder = write_synthetic(tmp_path / "data", SyntheticConfig(
      n_users=120, n_items=60, mean_interactions=10, name="tiny"))
  # lr = 0: the models keep their random initialisation (runlocal would raise the rate).
  cfg = uatmc_config.get_config(
      f"dataset={folder},seeds=1,defences=vanilla+uat_mc,attackers=pgd,epochs=1,patience=1,"
      "finetune_epochs=1,finetune_patience=1,batch_size=512,targets=3,attack_k=10,sweep=,"
      "mesh_data=1,lr=0")
  workdir = str(tmp_path / "run")
  results = uatmc.run_experiment(cfg, workdir)
  pop = results["protocol"]["popularity_valid_recall@20"]
  for name in ("vanilla", "uat_mc"):
    stage = json.load(open(os.path.join(workdir, "seed_1", name, "train_results.json")))
    verdict = stage["below_popularity"]
    assert stage["valid"]["recall@20"] <= pop
    assert verdict["model"] == stage["valid"]["recall@20"] and verdict["most_popular"] == pop
    assert verdict["metric"] == "recall@20" and verdict["advice"]
    assert results["defences"][name]["below_popularity"] == [1]
  on_disk = json.load(open(os.path.join(workdir, "results.json")))
  assert on_disk["defences"]["uat_mc"]["below_popularity"] == [1]
  table = open(os.path.join(workdir, "results.md")).read()
  assert table.index("Warning: below the most-popular baseline") < table.index("| Defence |")
  # Stage files: the targets and their clean Hit, in the order of the per-target values.
  attack = json.load(open(os.path.join(workdir, "seed_1", "vanilla",
                                       "attack_results_eps0.05.json")))["pgd"]
  assert len(attack["per_target_ids"]) == 3 == len(set(attack["per_target_ids"]))
  np.testing.assert_allclose(np.mean(attack["per_target_hit@10_before"]),
                             attack["hit@10_before"], rtol=1e-6)
  # TensorBoard: one run per stage, step = seed.
  for name in ("vanilla", "uat_mc"):
    got = read_scalars(os.path.join(workdir, "tensorboard", name))
    for tag in ("clean/ndcg@10", "clean/recall@20", "valid/recall@20", "below_popularity",
                "attack/eps0.05/hit@10_before", "attack/eps0.05/hit@10_after/pgd",
                "attack/eps0.05/avg_rank_change/pgd"):
      assert tag in got, (name, tag, sorted(got))
    (step, value), = got["attack/eps0.05/hit@10_after/pgd"]
    assert step == 1
    np.testing.assert_allclose(value, results["defences"][name]["attacks"]["pgd"]
                               ["hit@10_after"]["mean"], rtol=1e-6)
    assert got["below_popularity"] == [(1, 1.0)]
    np.testing.assert_allclose(got["clean/ndcg@10"][0][1],
                               results["defences"][name]["ndcg@10"]["mean"], rtol=1e-6)


def test_popularity_flag_compares_valid_recall():
  from uatmc_jax.recsys import experiment as uatmc
  pop = {"recall@20": 0.3}
  at = uatmc.below_popularity({"valid": {"recall@20": 0.3}}, pop)  # at counts as below
  assert (at["model"], at["most_popular"], at["split"]) == (0.3, 0.3, "valid")
  assert uatmc.below_popularity({"valid": {"recall@20": 0.2}}, pop)["model"] == 0.2
  assert uatmc.below_popularity({"valid": {"recall@20": 0.31}}, pop) is None
  assert uatmc.below_popularity({"valid": {"recall@20": 0.1}}, None) is None
  # The aggregate lists the seeds with a verdict (a dict), not those with None.
  assert bool(at) and not uatmc.below_popularity({"valid": {"recall@20": 0.31}}, pop)


# ----------------------------------------------------------------------------------
# Resume decisions on a pod: process 0 decides, the others follow.


class _FakePod:
  """Stands in for ``broadcast_one_to_all``: process 0's values, replayed on process 1."""

  def __init__(self):
    self.sent, self.replay = [], None

  def broadcast(self, x, is_source=None):
    x = np.asarray(x)
    if self.replay is None:  # process 0: its own value goes out
      self.sent.append(x.copy())
      return x
    got = self.replay.pop(0)
    assert got.shape == x.shape and got.dtype == x.dtype  # the receiver's buffer fits
    return got


def test_resume_decided_on_primary_and_followed(tmp_path, monkeypatch):
  import jax
  from jax.experimental import multihost_utils
  from uatmc_jax.recsys import stage_io
  path = str(tmp_path / "train_results.json")
  pod = _FakePod()
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", pod.broadcast)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  # Process 0 sees a finished stage.
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with open(path, "w") as f:
    json.dump({"valid": {"recall@20": 0.25}, "config": {"lr": 1}}, f)
  primary = stage_io.saved_json(path)
  assert primary == {"valid": {"recall@20": 0.25}, "config": {"lr": 1}}
  # Process 1 does not see the file (no shared disk): it follows process 0 and resumes.
  os.remove(path)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  pod.replay = list(pod.sent)
  assert stage_io.saved_json(path) == primary
  assert pod.replay == []
  # The other way round: process 0 sees nothing, process 1 has a stale file: no resume.
  pod.sent, pod.replay = [], None
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert stage_io.saved_json(path) is None
  with open(path, "w") as f:
    json.dump({"stale": True}, f)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  pod.replay = list(pod.sent)
  assert stage_io.saved_json(path) is None


def test_single_process_decides_alone(tmp_path, monkeypatch):
  from jax.experimental import multihost_utils
  from uatmc_jax.core.parallel import multihost
  from uatmc_jax.recsys import stage_io

  def refuse(*a, **k):
    raise AssertionError("no broadcast on one process")

  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", refuse)
  path = tmp_path / "x.json"
  assert stage_io.saved_json(str(path)) is None
  path.write_text('{"a": [1, 2]}')
  assert stage_io.saved_json(str(path)) == {"a": [1, 2]}
  assert multihost.broadcast_from_primary({"b": None}) == {"b": None}


# ----------------------------------------------------------------------------------
# Remote workdirs: gs:// paths stay remote (an in-memory filesystem stands in for GCS).


def test_remote_paths_not_made_local(tmp_path, monkeypatch):
  import types
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem
  from uatmc_jax.core import reporting
  from uatmc_jax.recsys import stage_io
  from uatmc_jax.recsys import report

  mem = MemoryFileSystem()
  monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: mem)
  real_abspath = os.path.abspath

  def abspath(p):
    assert "gs:" not in str(p), f"abspath of a remote path: {p}"
    return real_abspath(p)

  monkeypatch.setattr(os.path, "abspath", abspath)
  monkeypatch.chdir(tmp_path)
  root = "gs://bucket/run"
  assert reporting.is_remote_path(root) and not reporting.is_remote_path(str(tmp_path))
  stage_io.make_dirs(root)
  reporting.write_json(stage_io.join_path(root, "seed_1", "vanilla", "train_results.json"),
                    {"x": float("nan"), "y": np.float32(2.0)})
  assert stage_io.saved_json(f"{root}/seed_1/vanilla/train_results.json") == {"x": None, "y": 2.0}
  assert stage_io.saved_json(f"{root}/seed_1/apr/train_results.json") is None
  reporting.write_text(f"{root}/results.md", "table")
  assert mem.cat(f"{root}/results.md") == b"table"
  per_seed, _ = _two_seed_inputs()
  cfg = types.SimpleNamespace(attack={"k": 50, "epsilon": 0.05}, sweep="")
  res = report.aggregate(cfg, per_seed, {}, ("fgsm", "pgd"), ("pgd",))
  report.tradeoff_plot(f"{root}/tradeoff.png", res)
  report.mismatch_plot(f"{root}/mismatch.png", per_seed)
  for name in ("tradeoff.png", "mismatch.png"):
    assert mem.cat(f"{root}/{name}")[:4] == b"\x89PNG"
  # Nothing landed in a local "gs:" folder.
  assert not os.path.exists(tmp_path / "gs:")


def test_mismatch_plot_without_cosines_warns_nothing(tmp_path):
  # A backbone without a shared projected space records no per-target cosines: the
  # plot says so instead of an empty legend (matplotlib warns on one).
  import warnings
  from uatmc_jax.recsys import report
  per_seed = {1: {"vanilla": {"attacks": {"pgd": {"per_target_cosine_clean": [],
                                                   "per_target_cosine_after": []}}}}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    report.mismatch_plot(str(tmp_path / "mismatch.png"), per_seed)
  assert (tmp_path / "mismatch.png").read_bytes()[:4] == b"\x89PNG"
