"""runner.compare on run folders made by the runner itself: verdicts, claims, CLI."""
import json
import math

import pytest
import torch

from runner import compare
from runner.analysis import claims as claim_checks
from runner.analysis.runs import find_runs, pick_reference
from runner.recording import record
from runner.recording.record import Summary
from tests.conftest import train


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """full, accumulate (equivalent), scale=mean on an uneven split (differs), float64, an error."""
    base = tmp_path_factory.mktemp("runs")
    made = {}
    for name, overrides in {
        "full": dict(data__batch_size=30),
        "accumulate": dict(data__batch_size=30, backward__name="accumulate", backward__accumulation=4),
        "mean": dict(data__batch_size=30, backward__name="accumulate", backward__accumulation=4,
                     backward__scale="mean"),
    }.items():
        summary, _, run_dir = train(base / name, trainer__steps=30, **overrides)
        # train() does not go through Hydra; give the summaries the choices the CLI records
        summary["choices"] = {"backward": overrides.get("backward__name", "full")}
        summary["config"] = {"backward": {"scale": str(overrides.get("backward__scale", "size"))}}
        record.write_summary(run_dir, Summary(**summary))
        made[name] = run_dir
    error_dir = base / "error"
    error_dir.mkdir()
    record.write_summary(error_dir, Summary(status="error", error="RuntimeError: boom",
                                            choices={"backward": "naive"}))
    made["error"] = error_dir
    return base, made


def by_dir(table):
    return {row["run_dir"]: row for _, row in table.iterrows()}


def test_verdicts_against_the_full_batch_reference(runs):
    base, made = runs
    found = find_runs([base])
    assert len(found) == 4
    reference = pick_reference(found)
    assert reference.path == made["full"]
    rows = by_dir(compare.build_table(found, reference))
    assert rows[str(made["full"])]["verdict"] == "reference"
    assert rows[str(made["accumulate"])]["verdict"] == "equivalent"
    assert 0 < rows[str(made["accumulate"])]["max_abs_diff"] < 1e-5
    assert rows[str(made["mean"])]["verdict"] == "differs"
    assert rows[str(made["mean"])]["max_abs_diff"] > 1e-4
    assert rows[str(made["error"])]["verdict"] == "error"
    assert math.isnan(rows[str(made["error"])]["max_abs_diff"])


def test_max_abs_diff_is_computed_from_params_pt(runs):
    _, made = runs
    a = torch.load(made["accumulate"] / "params.pt", weights_only=True)
    b = torch.load(made["full"] / "params.pt", weights_only=True)
    expected = max(float((a[k] - b[k]).abs().max()) for k in a)
    found = find_runs([made["accumulate"], made["full"]])
    row = by_dir(compare.build_table(found, found[1]))[str(made["accumulate"])]
    assert row["max_abs_diff"] == pytest.approx(expected, rel=1e-12)


def test_claims_hold_and_fail(runs):
    base, _ = runs
    found = find_runs([base])
    claims = [
        {"kind": "equivalent", "runs": {"backward": "accumulate", "backward.scale": "size"},
         "reference": {"backward": "full"}},
        {"kind": "differs", "runs": {"backward.scale": "mean"}, "reference": {"backward": "full"}},
        {"kind": "fails", "runs": {"backward": "naive"}, "message": "boom"},
        {"kind": "equivalent", "runs": {"backward.scale": "mean"}, "reference": {"backward": "full"}},
        {"kind": "fails", "runs": {"backward": "naive"}, "message": "something else"},
        {"kind": "identical", "runs": {"backward": "nothing-matches"}},
        {"kind": "smaller", "metric": "peak_saved_bytes", "factor": 0.5,
         "runs": {"backward": "accumulate"}, "reference": {"backward": "full"}},
    ]
    assert [r.holds for r in claim_checks.evaluate_claims(claims, found)] == [True, True, True, False, False,
                                                                          False, True]
    assert claim_checks.unexpected_failures(found, claims[2:3]) == []
    assert len(claim_checks.unexpected_failures(found, [])) == 1


def test_cli_writes_csv_markdown_and_exit_codes(runs, tmp_path, capsys):
    base, made = runs
    out = tmp_path / "table.csv"
    assert compare.main([str(made["full"]), str(made["accumulate"]), "--out", str(out),
                         "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert "| equivalent |" in text and "| reference |" in text
    import pandas as pd

    table = pd.read_csv(out)
    assert {"status", "final_loss", "param_sha256", "max_abs_diff", "verdict", "peak_saved_bytes",
            "time_per_step_s", "run_dir"} <= set(table.columns)
    # The error run is not claimed to fail: the comparison says so with exit code 1.
    assert compare.main([str(base), "--format", "csv"]) == 1
    claims = tmp_path / "claims.yaml"
    claims.write_text(json.dumps({"claims": [{"kind": "fails", "runs": {"backward": "naive"}}]}))
    assert compare.main([str(base), "--claims", str(claims)]) == 0
    # --reference picks another run; a selector matching nothing is an input error.
    assert compare.main([str(made["full"]), str(made["mean"]), "--reference", "backward.scale=mean"]) == 0
    assert compare.main([str(base), "--reference", "backward=nope"]) == 2
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
