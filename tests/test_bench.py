"""The benchmark runs and reports every figure (the figures themselves are not asserted)."""
import csv

import torch

from runner import bench


def test_quick_bench_reports_every_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a smoke test: one thread keeps it quick on a busy machine
    try:
        assert bench.main(["--quick", "--only", "step", "sequence", "cold", "probe", "memory", "--out", str(tmp_path / "b.csv")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    kinds = [r["benchmark"] for r in rows]
    # mlp/cnn x full/accumulate, each against the bare loop, the answer's loop as written and the
    # loop recording what the runner records
    assert kinds.count("step") == 12 and kinds.count("cold start") == 1 and kinds.count("memory") == 8
    assert sum("as written" in r["case"] for r in rows) == 4
    assert kinds.count("probe") == 4 and kinds.count("sequence step") == 2
    for row in rows:
        assert float(row["runner"]) > 0 and float(row["baseline"]) > 0
    assert all(r["result"].startswith("ratio") for r in rows if r["benchmark"] in ("step", "sequence step"))
    assert all(r["met"] in ("True", "False") for r in rows if r["target"])
    assert "backward-lab bench" in capsys.readouterr().out
