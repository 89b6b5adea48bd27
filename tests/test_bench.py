"""The benchmark runs and reports every figure (the figures themselves are not asserted)."""
import csv

from runner import bench


def test_quick_bench_reports_every_ratio(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--quick", "--only", "step", "cold", "memory", "--out", str(tmp_path / "b.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    kinds = [r["benchmark"] for r in rows]
    assert kinds.count("step") == 4 and kinds.count("cold start") == 1 and kinds.count("memory") == 8
    for row in rows:
        assert float(row["runner"]) > 0 and float(row["baseline"]) > 0
    assert all(r["result"].startswith("ratio") for r in rows if r["benchmark"] == "step")
