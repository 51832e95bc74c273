"""End-to-end: experiments.uatmc on a tiny synthetic folder: result keys and invariants."""
import json
import os

import numpy as np
import pytest

from uatmc_jax.recsys.data.synthetic import SyntheticConfig, write_synthetic

DEFENCE_KEYS = ("vanilla", "apr", "amr", "uat_mc_no_align", "uat_mc")


@pytest.mark.slow
def test_uatmc_experiment_end_to_end_and_resume(tmp_path):
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
  for name in ("results.md", "tradeoff.png", "mismatch.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  table = open(os.path.join(workdir, "results.md")).read()
  for row in ("Vanilla", "APR", "AMR", "UAT-MC w/o align", "UAT-MC"):
    assert f"| {row} |" in table
  assert "Hit@10 PGD" in table and "Hit@50" not in table
  assert "mean ± sample std (ddof 1) over 1 seeds" in table
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
    uatmc.attackers_for(uatmc_config.get_config("attackers=pgd+pgd_typo"))
  with pytest.raises(ConfigError, match="distinct budgets"):
    uatmc_config.get_config("attack_epsilon=0.1+0.1")
  # A changed training config in the same workdir is refused with the field named.
  other_lr = uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1,lr=0.5")
  with pytest.raises(ConfigError, match="learning_rate"):
    uatmc.run_experiment(other_lr, workdir)


def test_vbpr_runs_only_what_needs_no_shared_space():
  from uatmc_jax.recsys import experiment as uatmc
  from uatmc_jax.recsys.attacks import protocol
  from experiments.configs import uatmc as uatmc_config
  from uatmc_jax.core.errors import ConfigError
  with pytest.raises(ConfigError, match="uat_mc.*shared projected space"):
    uatmc.attackers_for(uatmc_config.get_config("model=vbpr"))
  attackers, sweep = uatmc.attackers_for(
      uatmc_config.get_config("model=vbpr,defences=vanilla+apr+uat_mc_no_align"))
  assert "pgd_aligned" not in attackers and "pgd_aligned" not in sweep
  assert uatmc.attackers_for(uatmc_config.get_config("model=mmgcn"))[0] == protocol.ATTACKERS
