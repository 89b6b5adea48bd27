"""Seeds as replicates: each run against its own seed's reference, replicates.csv, and impact."""
import math

import pandas as pd

from runner.analysis.claims import evaluate_claim
from runner.analysis.replicates import groups, impact, same_seed_reference
from runner.analysis.runs import find_runs
from tests.conftest import run_here, train

SMALL = ["trainer.steps=3", "data.train_size=256", "data.eval_size=64"]


def test_a_sweep_over_seeds_pairs_each_run_with_its_own_seeds_reference(tmp_path):
    sweep = tmp_path / "seeds"
    result = run_here("-m", "seed=0,1,2", "backward=full,accumulate", "backward.accumulation=2,4", *SMALL,
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = pd.read_csv(sweep / "comparison.csv")
    # Seed 1's accumulate against seed 1's full, never against seed 0's: equivalent, not "differs".
    assert set(table["verdict"]) <= {"reference", "equivalent", "identical"}
    assert (table.loc[table["backward"] == "accumulate", "max_abs_diff"] < 1e-5).all()
    replicates = pd.read_csv(sweep / "replicates.csv")
    # full at k = 2 and at k = 4 is one training (the second reused): one replicate per seed, n = 3.
    assert sorted(replicates["backward"]) == ["accumulate", "accumulate", "full"] and (replicates["n"] == 3).all()
    assert {"final_loss_mean", "final_loss_std", "final_loss_min", "final_loss_max", "eval_value_mean",
            "max_abs_diff_max", "grad_rel_diff_mean", "impact", "impact_verdict"} <= set(replicates.columns)
    verdicts = replicates.groupby("backward")["impact_verdict"].apply(set)
    assert verdicts["full"] == {"reference"} and verdicts["accumulate"] == {"negligible"}
    assert "mean ± std" in result.stdout


def _runs(tmp_path, configs, seeds):
    for seed in seeds:
        for overrides in configs:
            train(tmp_path / "runs", seed=seed, **overrides)
    return find_runs([tmp_path / "runs"])


SEQ = dict(model__name="seq", data__name="seq", loss__name="lm", model__hidden=16, data__max_length=12,
           data__train_size=512, data__eval_size=64, trainer__steps=40, trainer__memory="off",
           backward__name="accumulate", backward__accumulation=8, optim__scheduler="cosine", optim__warmup_steps=4,
           optim__lr=0.5)


def test_impact_says_whether_a_difference_matters_beyond_seed_noise(tmp_path):
    """The schedule advanced per micro-batch at k = 8 costs loss (visible); sum is full (negligible)."""
    runs = _runs(tmp_path, [SEQ, dict(SEQ, optim__scheduler_every="micro_batch"), dict(SEQ, backward__name="sum")],
                 seeds=[0, 1, 2])
    by_config = groups(runs)
    reference = next(r for r in runs if r.keys["backward"] == "accumulate"
                     and r.keys["optim.scheduler_every"] == "step")
    reference_runs = next(members for members in by_config.values() if reference in members)
    per_micro_batch = next(m for m in by_config.values() if m[0].keys["optim.scheduler_every"] == "micro_batch")
    summed = next(m for m in by_config.values() if m[0].keys["backward"] == "sum")
    bug = impact(per_micro_batch, reference_runs)
    assert bug.verdict == "visible" and bug.value > 1 and bug.seeds == 3
    same = impact(summed, reference_runs)
    assert same.verdict == "negligible" and abs(same.value) < 0.01
    # The claim kind: at least 1σ for the bug, at most 0.5σ for sum; a bound it misses fails.
    claim = dict(kind="impact", runs={"optim.scheduler_every": "micro_batch"},
                 reference={"backward": "accumulate", "optim.scheduler_every": "step"})
    assert evaluate_claim(dict(claim, at_least=1), runs, {}).holds
    assert not evaluate_claim(dict(claim, at_most=0.5), runs, {}).holds
    assert evaluate_claim(dict(claim, runs={"backward": "sum"}, at_most=0.5), runs, {}).holds
    # Pairing: every run's reference is the reference configuration's run of its own seed.
    for run in runs:
        assert same_seed_reference(run, reference, runs).keys["seed"] == run.keys["seed"]


def test_two_seeds_cannot_say(tmp_path):
    runs = _runs(tmp_path, [dict(trainer__steps=2, data__train_size=256, data__eval_size=64),
                            dict(trainer__steps=2, data__train_size=256, data__eval_size=64,
                                 backward__name="sum", backward__accumulation=2)], seeds=[0, 1])
    members = list(groups(runs).values())
    found = impact(members[1], members[0])
    assert found.verdict == "unknown" and math.isnan(found.value) and found.seeds == 2


def _fake_run(folder, seed: int, backward: str, losses, param_sums, lr: float = 0.5):
    """A finished run's records, written as a run writes them (no training: a picture's input)."""
    from runner.recording import record

    folder.mkdir(parents=True)
    writer = record.MetricsWriter(folder)
    writer.write_rows([{"step": i + 1, "loss": loss, "grad_norm": 1.0, "param_sum": p, "time_s": 0.0}
                       for i, (loss, p) in enumerate(zip(losses, param_sums))])
    writer.close()
    record.write_summary(folder, record.Summary(
        status="ok", steps_done=len(losses), final_loss=losses[-1], param_sum=param_sums[-1], dtype="float32",
        seed=seed, choices={"backward": backward},
        config={"seed": seed, "backward": {"name": backward}, "optim": {"lr": lr}}))


def test_the_picture_of_many_runs_stays_readable(tmp_path):
    """160 seeds of a single step: one group drawn as a marker with its range, no matplotlib warning;
    a dozen-plus configurations get a compact legend of colours and styles."""
    import random
    import warnings

    from runner.analysis.pictures import draw

    rng = random.Random(0)
    for seed in range(160):
        _fake_run(tmp_path / "seeds" / f"{seed}_seed={seed}", seed, "full", [rng.random()], [rng.random()])
    for i in range(14):
        _fake_run(tmp_path / "many" / f"{i}_x", 0, ["full", "sum"][i % 2], [1.0, 0.9 - i / 100, 0.8],
                  [1.0, 1.0 + i * 1e-7, 2.0 + i * 1e-3], lr=i / 10)
    for name in ("seeds", "many"):
        runs = find_runs([tmp_path / name])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            picture = draw(runs, runs[0], tmp_path / name)
        assert picture.stat().st_size > 10_000
