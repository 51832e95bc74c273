"""End-to-end: experiments.uatmc on a tiny synthetic folder produces every result key."""
import json
import os

import pytest

from uatmc_jax.data.synthetic import SyntheticConfig, write_synthetic

DEFENCE_KEYS = ("vanilla", "apr", "amr", "uat_mc_no_align", "uat_mc")


@pytest.mark.slow
def test_uatmc_experiment_end_to_end_and_resume(tmp_path):
  from experiments import uatmc
  from experiments.configs import uatmc as uatmc_config

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
        for key in ("hit@50_before", "hit@50_after", "avg_rank_change"):
          assert set(attack[key]) == {"mean", "std"}
          assert attack[key]["mean"] is not None
  for name in ("results.md", "tradeoff.png", "mismatch.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  table = open(os.path.join(workdir, "results.md")).read()
  for row in ("Vanilla", "APR", "AMR", "UAT-MC w/o align", "UAT-MC"):
    assert f"| {row} |" in table
  # Every stage wrote its own result file; a rerun skips them all and reproduces the table.
  for name in DEFENCE_KEYS:
    stage = os.path.join(workdir, "seed_1", name)
    assert os.path.isfile(os.path.join(stage, "train_results.json"))
    assert os.path.isfile(os.path.join(stage, "attack_results.json"))
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
  saved = json.load(open(os.path.join(stage, "attack_results.json")))
  assert saved["settings"]["epsilon"] == 0.5
  assert os.path.getmtime(os.path.join(stage, "train_results.json")) == trained_at
  assert wide["defences"]["vanilla"]["recall@20"] == results["defences"]["vanilla"]["recall@20"]
  # A changed training config in the same workdir is refused with the field named.
  from uatmc_jax.errors import ConfigError
  other_lr = uatmc_config.get_config(
      f"dataset={folder},seeds=1,runlocal=True,epochs=2,finetune_epochs=1,batch_size=512,"
      "targets=4,attack_k=10,sweep=,mesh_data=1,lr=0.5")
  with pytest.raises(ConfigError, match="learning_rate"):
    uatmc.run_experiment(other_lr, workdir)


def test_vbpr_runs_only_what_needs_no_shared_space():
  from experiments import uatmc
  from experiments.configs import uatmc as uatmc_config
  from uatmc_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="uat_mc.*shared projected space"):
    uatmc.attackers_for(uatmc_config.get_config("model=vbpr"))
  attackers, sweep = uatmc.attackers_for(
      uatmc_config.get_config("model=vbpr,defences=vanilla+apr+uat_mc_no_align"))
  assert "pgd_aligned" not in attackers and "pgd_aligned" not in sweep
  assert uatmc.attackers_for(uatmc_config.get_config("model=mmgcn"))[0] == uatmc.ATTACKERS
