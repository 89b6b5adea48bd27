"""What the runner costs beyond what any training script pays. Prints ratios, writes bench.csv.

    python -m runner.bench [--quick] [--out bench.csv] [--device cpu|cuda] [--only SECTION ...]

1. step: the runner's loop (train.run) against a hand-written PyTorch loop of the same model,
   data, seed and strategy, interleaved repeats, minima (target: within 3%); against the
   accumulation answer's loop as users write it, .item() and the checksum printed every step
   (target: faster); and against the bare loop recording what the runner records per step.
   sequence: a causal LM with loss=lm (normalize=tokens) against the hand-written token-count
   loop (target: within 5%).
2. sweep: cost per job of `python -m runner -m` beyond a minimal Hydra app sweeping the same
   jobs, from the slope between a short and a long sweep (target: <= 50 ms per job).
3. cold start: `python -m runner trainer.steps=1` against a process that imports torch and hydra
   and builds one optimizer (target: within 0.6 s).
4. probe: what the coupling probe (does an example's output depend on another's input? does the
   forward draw random numbers?) costs at start-up, against one forward and backward of a batch.
5. memory: peak_saved_bytes of sum and accumulate at accumulation 1, 2, 4, 8 (and
   torch.cuda.max_memory_allocated on a GPU).
   contrastive: backward=gradcache's step against accumulate's at the same accumulation, on a dual
   encoder with loss=infonce (every forward runs twice, so target: ratio <= 1.5).
   trackers: the step with trainer.loggers=[csv,mlflow,tensorboard] against csv alone (target:
   within 10%; needs the trackers extra).
6. launchers (only with --only launchers: minutes): heavier jobs with the basic launcher and joblib.
Figures are measurements, not test assertions.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from runner.config.schema import Config
from runner.recording import record
from runner.training.build import build_training
from runner.training.train import run

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Bench(Config):
    """A config built in Python, with its model's and data source's arguments beside it (model.hidden,
    data.max_length: the keys their classes declare, which the Config's nodes do not hold)."""

    model_args: Dict[str, Any] = field(default_factory=dict)
    data_args: Dict[str, Any] = field(default_factory=dict)


def build(cfg: Bench):
    return build_training(cfg, model_kwargs=cfg.model_args, data_kwargs=cfg.data_args)


def config(model: str, strategy: str, steps: int, device: str) -> Bench:
    cfg = Bench()
    cfg.model.name = model
    if model != "cnn":  # the classes that take model.hidden
        cfg.model_args["hidden"] = 512
    cfg.data.batch_size, cfg.data.train_size, cfg.data.eval_size = 512, 8192, 0
    cfg.backward.name, cfg.backward.accumulation = strategy, 4 if strategy != "full" else 1
    cfg.trainer.steps, cfg.trainer.device, cfg.trainer.progress = steps, device, False
    cfg.trainer.eval = False
    return cfg


def seconds_per_step(training, steps: int, one_step: Callable[[int, float], None]) -> float:
    """Time `one_step(step, start)` over `steps` steps. On CPU, steady state: steps 2..n, as
    runner_loop measures (the first step carries one-time costs); on CUDA the whole loop, whose
    end waits for the device."""
    sync = torch.cuda.synchronize if training.device.type == "cuda" else (lambda: None)
    sync()
    start = first_done = time.perf_counter()
    for step in range(steps):
        if step == 1:
            first_done = time.perf_counter()
        one_step(step, start)
    sync()
    if training.device.type == "cuda":
        return (time.perf_counter() - start) / steps
    return (time.perf_counter() - first_done) / (steps - 1)


def hand_written_loop(training, steps: int, records: bool = False, as_written: bool = False) -> float:
    """The loop a user writes: the accumulation answer's, with the loss read once per micro-batch.

    records=True also records what the runner records per step: the gradient norm, the sum of
    the parameters (as the accumulation answer prints it) and a CSV row flushed to the OS.
    as_written=True is the answer's loop as users copy it: the loss's .item() and the checksum
    sum(p.sum().item() ...) printed every step (to /dev/null here, so the terminal costs nothing).
    """
    import io

    model, optimizer = training.model, training.optimizers[0]
    objective = torch.nn.BCEWithLogitsLoss()
    params = list(model.parameters())
    k = training.strategy.accumulation
    log = csv.writer(metrics := io.TextIOWrapper(open(os.devnull, "wb"), newline=""), lineterminator="\n")
    printed = open(os.devnull, "w")

    def one_step(step: int, start: float) -> None:
        inputs, targets = training.dataset.batch(step)
        optimizer.zero_grad()
        loss_value = 0.0
        for x, y in zip(torch.tensor_split(inputs, k), torch.tensor_split(targets, k)):
            loss = objective(model(x), y) * (len(x) / len(inputs))
            loss.backward()
            loss_value += loss.item()
        if records:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
        optimizer.step()
        if records:
            param_sum = sum(p.detach().sum().item() for p in params)
            log.writerow([step + 1, loss_value, grad_norm, param_sum, time.perf_counter() - start])
            metrics.flush()
        if as_written:
            print(step, loss_value, sum(p.sum().item() for p in model.parameters()), file=printed, flush=True)

    try:
        return seconds_per_step(training, steps, one_step)
    finally:
        metrics.close()
        printed.close()


def runner_loop(cfg: Bench, workdir: Path) -> float:
    """Seconds per step of train.run. On CPU, steady state: from the end of step 1 to the end of
    step n, as metrics.csv's time_s says (the first step carries one-time costs, such as the
    saved-tensor meter, on both sides); on CUDA the whole loop, whose end waits for the device."""
    training = build(cfg)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    outcome = run(training, run_dir)
    assert outcome.status == "ok", outcome.summary.error
    if training.device.type == "cuda":
        return outcome.summary.time_per_step_s
    times = record.read_metrics(run_dir)["time_s"]
    return (times.iloc[-1] - times.iloc[0]) / (len(times) - 1)


def interleaved(loops: Dict[str, Callable[[], float]], repeats: int) -> Dict[str, List[float]]:
    """Seconds per step of each loop, `repeats` times after a warm-up, in ABC CBA ... order so
    that drifts in machine load hit all alike."""
    times: Dict[str, List[float]] = {name: [] for name in loops}
    for loop in loops.values():
        loop()  # warm-up: allocator, kernels, lazy imports
    for i in range(repeats):
        for name in (list(loops) if i % 2 == 0 else list(loops)[::-1]):
            times[name].append(loops[name]())
    return times


def sequence_config(strategy: str, steps: int, device: str, quick: bool = False) -> Bench:
    cfg = config("seq", strategy, steps, device)
    cfg.data.name, cfg.loss.name = "seq", "lm"
    cfg.model_args["hidden"], cfg.model.vocab, cfg.model_args["depth"] = (32, 16, 1) if quick else (128, 64, 1)
    cfg.data.batch_size, cfg.data.train_size, cfg.data_args["max_length"] = (64, 256, 16) if quick else (64, 2048, 64)
    return cfg


def hand_written_token_loop(training, steps: int) -> float:
    """The token-count loop a user writes since the 2024 fix (transformers #34191): count the
    batch's scored tokens first, divide each micro-batch's summed loss by that count."""
    model, optimizer = training.model, training.optimizers[0]
    k = training.strategy.accumulation

    def one_step(step: int, start: float) -> None:
        inputs, labels = training.dataset.batch(step)
        optimizer.zero_grad()
        count = (labels != -100).sum()
        loss_value = 0.0
        for x, y in zip(torch.tensor_split(inputs, k), torch.tensor_split(labels, k)):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                     reduction="sum") / count
            loss.backward()
            loss_value += loss.item()
        optimizer.step()

    return seconds_per_step(training, steps, one_step)


def bench_sequence_steps(rows: List[Dict], repeats: int, steps: int, device: str, workdir: Path,
                         quick: bool = False) -> None:
    """A causal LM on variable-length sequences, loss=lm normalised by tokens: the runner against
    the hand-written token-count loop (target: within 5%)."""
    for strategy in ("full", "accumulate"):
        cfg = sequence_config(strategy, steps, device, quick)
        times = interleaved({"runner": lambda: runner_loop(cfg, workdir),
                             "hand": lambda: hand_written_token_loop(build(cfg), steps)}, repeats)
        r, h = statistics.median(times["runner"]), statistics.median(times["hand"])
        spread = max(map(_spread, times.values()))
        rows.append(dict(benchmark="sequence step",
                         case=f"seq (GRU {cfg.model_args['hidden']}, vocab {cfg.model.vocab}, lengths "
                              f"2..{cfg.data_args['max_length']}) {strategy}, batch 64, loss=lm tokens ({device}) "
                              "vs hand-written token-count loop",
                         runner=r * 1e3, baseline=h * 1e3, unit="ms/step",
                         result=f"ratio {r / h:.3f} (spread {spread:.1%})", target="ratio <= 1.05", met=r / h <= 1.05))


def bench_policy_steps(rows: List[Dict], repeats: int, steps: int, device: str, workdir: Path,
                       quick: bool = False) -> None:
    """loss=grpo on data=rollouts (the clipped surrogate per token, token_mean over the window's tokens) against
    loss=lm on data=seq of the same model, batch and lengths, both accumulate at k=4 (target: ratio <= 1.2)."""
    configs = {}
    for name, (data, loss) in {"grpo": ("rollouts", "grpo"), "lm": ("seq", "lm")}.items():
        cfg = sequence_config("accumulate", steps, device, quick)
        cfg.data.name, cfg.loss.name = data, loss
        configs[name] = cfg
    cfg = configs["grpo"]
    rows.append(runner_ratio_row(
        "policy step", configs, "grpo", "lm", 1.2, repeats, workdir,
        f"seq (GRU {cfg.model_args['hidden']}, vocab {cfg.model.vocab}, completions up to "
        f"{cfg.data_args['max_length']}) accumulate, batch {cfg.data.batch_size} in 4 ({device}): "
        "loss=grpo on data=rollouts vs loss=lm on data=seq"))


def runner_ratio_row(benchmark: str, configs: Dict[str, Bench], measured: str, baseline: str, target: float,
                     repeats: int, workdir: Path, case: str) -> Dict:
    """Two runner loops timed interleaved (the median of each): a row with the ratio of `measured` to `baseline`."""
    times = interleaved({name: (lambda c=c: runner_loop(c, workdir)) for name, c in configs.items()}, repeats)
    m, b = statistics.median(times[measured]), statistics.median(times[baseline])
    spread = max(map(_spread, times.values()))
    return dict(benchmark=benchmark, case=case, runner=m * 1e3, baseline=b * 1e3, unit="ms/step",
                result=f"ratio {m / b:.3f} (spread {spread:.1%})", target=f"ratio <= {target}", met=m / b <= target)


def contrastive_config(strategy: str, k: int, steps: int, device: str, quick: bool = False) -> Bench:
    cfg = config("dual_encoder", strategy, steps, device)
    cfg.data.name, cfg.loss.name, cfg.model.outputs, cfg.backward.accumulation = "pairs", "infonce", 16, k
    if quick:
        cfg.model_args["hidden"], cfg.data.batch_size, cfg.data.train_size = 64, 64, 512
    return cfg


def bench_contrastive_steps(rows: List[Dict], repeats: int, steps: int, device: str, workdir: Path,
                            quick: bool = False) -> None:
    """GradCache embeds each micro-batch twice (without, then with a graph) where accumulate
    forwards it once: its step against accumulate's at the same k (target: ratio <= 1.5)."""
    for k in (2, 8):
        configs = {name: contrastive_config(name, k, steps, device, quick) for name in ("gradcache", "accumulate")}
        cfg = configs["gradcache"]
        rows.append(runner_ratio_row(
            "contrastive step", configs, "gradcache", "accumulate", 1.5, repeats, workdir,
            f"dual_encoder (hidden {cfg.model_args['hidden']}) infonce, batch {cfg.data.batch_size} in {k} ({device}): "
            "gradcache vs accumulate"))


def bench_tracker_steps(rows: List[Dict], repeats: int, steps: int, device: str, workdir: Path) -> None:
    """The same training logged to csv alone and to csv, MLflow (a SQLite store in workdir) and
    TensorBoard: what the trackers add per step (target: within 10%). Ten times the other steps'
    length, so that the steady state holds several of the trackers' sends
    (runner.recording.trackers.SEND_EVERY_S)."""
    configs = {}
    for loggers in (["csv"], ["csv", "mlflow", "tensorboard"]):
        cfg = config("mlp", "accumulate", 10 * steps, device)
        cfg.trainer.loggers = loggers
        configs["+".join(loggers)] = cfg
    times = interleaved({name: (lambda c=c: runner_loop(c, workdir)) for name, c in configs.items()}, repeats)
    (alone, tracked), spread = (statistics.median(t) for t in times.values()), max(map(_spread, times.values()))
    rows.append(dict(benchmark="trackers step",
                     case=f"mlp accumulate x4, batch 512 ({device}): loggers=[csv,mlflow,tensorboard] vs [csv]",
                     runner=tracked * 1e3, baseline=alone * 1e3, unit="ms/step",
                     result=f"ratio {tracked / alone:.3f} (spread {spread:.1%})", target="ratio <= 1.10",
                     met=tracked / alone <= 1.10))


def bench_steps(rows: List[Dict], repeats: int, steps: int, device: str, workdir: Path) -> None:
    for model in ("mlp", "cnn"):
        for strategy in ("full", "accumulate"):
            cfg = config(model, strategy, steps, device)
            loops = {"runner": lambda: runner_loop(cfg, workdir),
                     "bare": lambda: hand_written_loop(build(cfg), steps),
                     "as written": lambda: hand_written_loop(build(cfg), steps, as_written=True),
                     "records": lambda: hand_written_loop(build(cfg), steps, records=True)}
            times = interleaved(loops, repeats)
            r, fastest = statistics.median(times["runner"]), min(times["runner"])
            spread = max(map(_spread, times.values()))
            # The target reads the minima (each side's least disturbed repeat); the median beside it.
            for baseline, case, limit in (
                    ("bare", "hand-written loop", 1.03),
                    ("as written", "the answer's loop as written (.item() and checksum printed per step)", 1.0),
                    ("records", "hand-written loop recording the same per-step numbers", None)):
                h, ratio = statistics.median(times[baseline]), fastest / min(times[baseline])
                rows.append(dict(benchmark="step", case=f"{model} {strategy}, batch 512 ({device}) vs {case}",
                                 runner=r * 1e3, baseline=h * 1e3, unit="ms/step",
                                 result=f"ratio {ratio:.3f} of minima, {r / h:.3f} of medians (spread {spread:.1%})",
                                 target=f"ratio {'<=' if limit > 1 else '<'} {limit:g}" if limit else "",
                                 met=(ratio <= limit if limit > 1 else ratio < limit) if limit else ""))


def _spread(times: List[float]) -> float:
    """Median absolute deviation relative to the median: how much one repeat varies."""
    middle = statistics.median(times)
    return statistics.median(abs(t - middle) for t in times) / middle


def _python(*args: str, cwd: Path, env: Dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    return time.perf_counter() - start


MINIMAL_HYDRA_APP = textwrap.dedent('''
    import hydra, torch
    @hydra.main(version_base="1.3", config_path=None, config_name=None)
    def app(cfg):
        pass
    if __name__ == "__main__":
        app()
''')


# The same Hydra app as the runner (same conf/, same schema) with a task that does nothing and
# without the runner's sweep callback: what Hydra itself spends per job on this config.
SAME_CONFIG_HYDRA_APP = textwrap.dedent('''
    import hydra, torch
    from runner.config import schema
    schema.register()
    @hydra.main(version_base="1.3", config_path=%r, config_name="config")
    def app(cfg):
        pass
    if __name__ == "__main__":
        app()
''')


def bench_sweep(rows: List[Dict], repeats: int, workdir: Path) -> None:
    apps = {"minimal": workdir / "minimal_app.py", "same config": workdir / "same_config_app.py"}
    apps["minimal"].write_text(MINIMAL_HYDRA_APP)
    apps["same config"].write_text(SAME_CONFIG_HYDRA_APP % str(ROOT / "conf"))

    def sweep_time(jobs: int, which: str) -> float:
        seeds = ",".join(str(i) for i in range(jobs))
        out = f"hydra.sweep.dir={tempfile.mkdtemp(dir=workdir)}"
        if which == "runner":
            return _python("-m", "runner", "-m", f"seed={seeds}", "trainer.steps=1", "data.train_size=64",
                           "data.eval_size=16", out, cwd=workdir)
        if which == "minimal":
            return _python(str(apps["minimal"]), "-m", f"+seed={seeds}", out, cwd=workdir)
        return _python(str(apps["same config"]), "-m", f"seed={seeds}", "~hydra.callbacks.sweep", out, cwd=workdir)

    small, large = 2, 10
    slopes = {}
    for which in ("runner", "minimal", "same config"):
        per_job = [(sweep_time(large, which) - sweep_time(small, which)) / (large - small) for _ in range(repeats)]
        slopes[which] = statistics.median(per_job)
    for baseline, case in (("minimal", "a minimal Hydra app"), ("same config", "Hydra on the runner's own config")):
        extra = (slopes["runner"] - slopes[baseline]) * 1e3
        rows.append(dict(benchmark="sweep", case=f"per job vs {case} (slope {small}->{large} jobs)",
                         runner=slopes["runner"] * 1e3, baseline=slopes[baseline] * 1e3, unit="ms/job",
                         result=f"extra {extra:.0f} ms", target="extra <= 50 ms", met=extra <= 50))


BASELINE_START = "import torch, hydra; torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)"


def bench_cold_start(rows: List[Dict], repeats: int, workdir: Path) -> None:
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_python("-m", "runner", "trainer.steps=1", f"hydra.run.dir={tempfile.mkdtemp(dir=workdir)}/r",
                            cwd=workdir))
        theirs.append(_python("-c", BASELINE_START, cwd=workdir))
    r, b = statistics.median(ours), statistics.median(theirs)
    rows.append(dict(benchmark="cold start", case="python -m runner trainer.steps=1", runner=r, baseline=b,
                     unit="s", result=f"extra {r - b:.2f} s", target="extra <= 0.6 s", met=r - b <= 0.6))


def bench_probe(rows: List[Dict], repeats: int, device: str) -> None:
    """What the coupling probe (runner.training.checks.probe_coupling) adds to start-up, against one
    forward and backward of the run's own batch; on the plain models and with BatchNorm."""
    from runner.training.checks import probe_coupling

    for model in ("mlp", "cnn"):
        for batchnorm in (False, True):
            cfg = config(model, "full", 1, device)
            cfg.model_args["batchnorm"] = batchnorm
            training = build(cfg)
            inputs, targets = training.dataset.batch(0)

            def step_once():
                loss = training.loss_fn(training.model(inputs), targets)
                torch.autograd.grad(loss, list(training.model.parameters()))

            probe, step = [], []
            for _ in range(repeats):
                probe.append(_seconds(lambda: probe_coupling(training.model, inputs), device))
                step.append(_seconds(step_once, device))
            p, b = statistics.median(probe), statistics.median(step)
            rows.append(dict(benchmark="probe", case=f"coupling probe, {model}{' + BatchNorm' if batchnorm else ''} "
                             f"({device}) vs one forward+backward of batch 512", runner=p * 1e3, baseline=b * 1e3,
                             unit="ms", result=f"ratio {p / b:.2f}", target="", met=""))


def _seconds(work, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    work()
    sync()
    return time.perf_counter() - start


def bench_memory(rows: List[Dict], device: str, workdir: Path) -> None:
    for model in ("mlp", "cnn"):
        full_cfg = config(model, "full", 1, device)
        full = run(build(full_cfg), Path(tempfile.mkdtemp(dir=workdir))).summary
        for k in (1, 2, 4, 8):
            measured = {}
            for strategy in ("sum", "accumulate"):
                cfg = config(model, strategy, 1, device)
                cfg.backward.accumulation = k
                measured[strategy] = run(build(cfg), Path(tempfile.mkdtemp(dir=workdir))).summary
            s, a = measured["sum"].peak_saved_bytes, measured["accumulate"].peak_saved_bytes
            cuda = ""
            if device == "cuda":
                cuda = (f"; cuda max allocated sum {measured['sum'].cuda_max_memory_allocated} B, "
                        f"accumulate {measured['accumulate'].cuda_max_memory_allocated} B")
            rows.append(dict(benchmark="memory", case=f"{model} accumulation {k}", runner=a, baseline=s,
                             unit="saved bytes (accumulate vs sum)",
                             result=f"sum/full {s / full.peak_saved_bytes:.2f}, accumulate/full "
                                    f"{a / full.peak_saved_bytes:.3f} (1/k = {1 / k:.3f}){cuda}",
                             target="", met=""))


def bench_launchers(rows: List[Dict], workdir: Path) -> None:
    args = ["backward=full,sum,accumulate", "backward.accumulation=2,4", "model=cnn", "data.batch_size=256",
            "trainer.steps=1000", "trainer.eval=false"]
    basic = _python("-m", "runner", "-m", *args, f"hydra.sweep.dir={tempfile.mkdtemp(dir=workdir)}/s", cwd=workdir)
    joblib = _python("-m", "runner", "-m", "hydra/launcher=joblib", *args,
                     f"hydra.sweep.dir={tempfile.mkdtemp(dir=workdir)}/s", cwd=workdir)
    rows.append(dict(benchmark="launchers", case=f"6 cnn jobs x 1000 steps, {os.cpu_count()} cores",
                     runner=joblib, baseline=basic, unit="s (joblib vs basic)",
                     result=f"speed-up {basic / joblib:.2f}x", target="faster than sequential",
                     met=joblib < basic))


def machine() -> str:
    """Date, CPU, torch and load: the figures mean little without them."""
    import datetime
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{datetime.date.today()}, {cpu} x{os.cpu_count()} ({torch.get_num_threads()} torch threads){gpu}"
            f"{load}, torch {torch.__version__}, Python {platform.python_version()}")


def print_table(rows: List[Dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"backward-lab bench, {machine()}")
    for column in ("benchmark", "case", "runner", "baseline", "unit", "result", "target", "met"):
        table.add_column(column)
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in
                 ("benchmark", "case", "runner", "baseline", "unit", "result", "target", "met")]
        table.add_row(*cells)
    Console(width=200).print(table)


SECTIONS = ("step", "sequence", "policy", "contrastive", "trackers", "sweep", "cold", "probe", "memory", "launchers")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and steps (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench.csv"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", choices=SECTIONS,
                        default=["step", "sequence", "policy", "contrastive", "trackers", "sweep", "cold", "probe",
                                 "memory"],
                        help="sections to run (default: all but launchers, which takes minutes)")
    args = parser.parse_args(argv)
    repeats, steps = (1, 5) if args.quick else (7, 150)
    process_repeats = 1 if args.quick else 3  # each repeat starts processes for seconds
    print(f"backward-lab bench, {machine()}", flush=True)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sections = {
            "step": lambda: bench_steps(rows, repeats, steps, args.device, workdir),
            "sequence": lambda: bench_sequence_steps(rows, repeats, steps, args.device, workdir, args.quick),
            "policy": lambda: bench_policy_steps(rows, repeats, steps, args.device, workdir, args.quick),
            "contrastive": lambda: bench_contrastive_steps(rows, repeats, steps, args.device, workdir, args.quick),
            "trackers": lambda: bench_tracker_steps(rows, repeats, steps, args.device, workdir),
            "sweep": lambda: bench_sweep(rows, process_repeats, workdir),
            "cold": lambda: bench_cold_start(rows, 2 * process_repeats - 1, workdir),
            "probe": lambda: bench_probe(rows, repeats, args.device),
            "memory": lambda: bench_memory(rows, args.device, workdir),
            "launchers": lambda: bench_launchers(rows, workdir),
        }
        for name in SECTIONS:
            if name in args.only:
                done = len(rows)
                sections[name]()
                for row in rows[done:]:  # progress, and what a stopped bench still shows
                    print(f"  {row['benchmark']}: {row['case']}: {row['result']}", flush=True)
                write_csv(rows, args.out)
    print_table(rows)
    print(f"wrote {args.out}")
    return 0


def write_csv(rows: List[Dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["benchmark", "case", "runner", "baseline", "unit", "result",
                                               "target", "met"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
