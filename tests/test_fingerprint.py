"""The fingerprint of a training loop (runner.fingerprint): the lab's own modes named back (the self-test),
every pair of modes told apart by a probe, users' loops named, and the command line's records."""
from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import torch

from runner.fingerprint import naming
from runner.fingerprint.loops import Custom, LoopError, Runner
from runner.fingerprint.probes import DIMENSIONS, PROBES
from runner.fingerprint.session import fingerprint, fingerprint_probe
from runner.recording import record
from tests.conftest import run_here

TOKEN_PROBES = ("tokens", "policy", "packed", "terms")
EXACT = {"uneven": "scale=size", **dict.fromkeys(TOKEN_PROBES, "normalize=tokens"),
         "short_window": "partial_window=exact", "short_epoch": "partial_window=exact",
         "warmup": "scheduler_every=step", "clip": "clip_every=step"}
# Each mode of the lab's own loop, and what the fingerprint must name on the probes where it shows; the
# other probes name the exact fix. (A key the probe's loss does not read is ignored: loss.normalize on bce.)
MODES = {
    "exact": ([], {}),
    "scale=mean": (["backward.scale=mean"], {"uneven": "scale=mean"}),
    "scale=none": (["backward.scale=none"], {"uneven": "scale=none"}),
    "keep=last": (["backward.keep=last"], {"uneven": "keep=last", **dict.fromkeys(TOKEN_PROBES, "keep=last")}),
    "keep=first": (["backward.keep=first"], {"uneven": "keep=first", **dict.fromkeys(TOKEN_PROBES, "keep=first")}),
    "normalize=micro_batch": (["loss.normalize=micro_batch"], dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch")),
    "normalize=micro_batch scale=mean": (["loss.normalize=micro_batch", "backward.scale=mean"],
                                         {"uneven": "scale=mean",
                                          **dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch scale=mean")}),
    "normalize=double": (["loss.normalize=double"], dict.fromkeys(TOKEN_PROBES, "normalize=double")),
    # loss=grpo's token count over M micro-batches (TRL PR #6024), packed rows' boundaries removed twice
    # (unsloth-zoo PR #348: the unpacked rows of tokens and terms refuse it), and label smoothing's term over
    # each micro-batch's own tokens (transformers #46731)
    "count_window=6": (["loss.count_window=6"], {"policy": "count_window=6"}),
    "boundaries=twice": (["loss.boundaries=twice"], {"packed": "boundaries=twice", "tokens": "not run",
                                                     "terms": "not run"}),
    "term_normalize=micro_batch": (["loss.term_normalize=micro_batch"], {"terms": "term_normalize=micro_batch"}),
    "partial_window=k": (["backward.partial_window=k"], {"short_window": "partial_window=k",
                                                          "short_epoch": "partial_window=k"}),
    "partial_window=drop": (["backward.partial_window=drop"], {"short_window": "partial_window=drop",
                                                                "short_epoch": "not run"}),
    "partial_window=carry": (["backward.partial_window=carry"], {"short_window": "partial_window=carry",
                                                                  "short_epoch": "partial_window=carry"}),
    "scheduler_every=micro_batch": (["optim.scheduler_every=micro_batch"], {"warmup": "scheduler_every=micro_batch"}),
    "clip_every=micro_batch": (["optim.clip_every=micro_batch"], {"clip": "clip_every=micro_batch"}),
    "backward=sum": (["backward=sum"], {}),
    "backward=full": (["backward=full"], {}),
}


def test_the_self_test_names_every_mode_back_and_tells_each_pair_apart():
    """Each mode of the lab's own loop, fingerprinted: the confusion table is diagonal (each probe names what
    the mode does there), and every pair of modes differs on some probe, named here. backward=sum and
    backward=full are the exact fix itself, as they should be. (One test: its fingerprints are computed once.)"""
    observed = {}
    for mode, (overrides, _) in MODES.items():
        result = fingerprint(Runner(), overrides)
        observed[mode] = {r.probe.name: r.named.observed for r in result.results}
        for r in result.results:  # the identity g = sum w_i grad L_i holds to float32's precision
            assert r.residual is None or r.residual < 1e-5, (mode, r.probe.name, r.residual)
    wrong = {}
    for mode, (_, expected) in MODES.items():
        for probe, name in observed[mode].items():
            want = expected.get(probe, EXACT[probe])
            if not name.startswith(want):
                wrong[(mode, probe)] = (want, name)
    assert wrong == {}
    distinct = [m for m in MODES if m not in ("backward=sum", "backward=full")]
    telling = {}
    for a, b in itertools.combinations(distinct, 2):
        probes = [p for p in PROBES if observed[a][p] != observed[b][p]]
        assert probes, (a, b)
        telling[(a, b)] = probes[0]
    assert telling[("scale=mean", "scale=none")] == "uneven"
    assert telling[("normalize=micro_batch", "normalize=micro_batch scale=mean")] == "uneven"
    assert telling[("partial_window=k", "partial_window=carry")] == "short_window"
    assert telling[("keep=last", "keep=first")] == "uneven"
    assert telling[("exact", "count_window=6")] == "policy"
    assert telling[("exact", "term_normalize=micro_batch")] == "terms"
    assert all(observed[m] == observed["exact"] for m in ("backward=sum", "backward=full"))


def test_a_term_over_each_micro_batchs_tokens_gets_its_own_weights():
    """The terms probe solves each term's weight: exact, both terms get 1/T of the window's T tokens; with
    term_normalize=micro_batch the smoothing term gets 1/t_i of the micro-batch's t_i tokens (k times its weight
    where the micro-batches score alike, transformers #46731), while the next-token term keeps 1/T."""
    for modes, smoothing in (([], lambda t: 1 / t.sum()), (["loss.term_normalize=micro_batch"], lambda t: 1 / t)):
        result = fingerprint_probe(Runner(), PROBES["terms"], modes)
        full = [s for s in result.steps if len(s.micro_batches) == 3]
        assert full and result.residual < 1e-5
        for step in full:
            tokens = torch.tensor([float(mb.count) for mb in step.micro_batches], dtype=torch.float64)
            assert torch.allclose(step.terms[:, 0], 1 / tokens.sum().expand(3), rtol=1e-4)
            assert torch.allclose(step.terms[:, 1], smoothing(tokens).expand(3), rtol=1e-4)


def test_weights_are_the_hand_computed_ones_for_a_nanogpt_loop():
    """nanoGPT's `loss / k` on micro-batches of 8, 8, 8, 6 (30 rows): weights 1/(k n_i), i.e. 30/32 = 0.9375 and
    30/24 = 1.25 of the exact 1/30, to float32 precision; the short window of one is divided by k too."""
    loop = Custom("runner.experiments.examples.loops.nanogpt")
    uneven = fingerprint_probe(loop, PROBES["uneven"])
    for step in uneven.steps:
        ratios = step.weights * 30
        assert torch.allclose(ratios, torch.tensor([0.9375, 0.9375, 0.9375, 1.25], dtype=torch.float64), atol=1e-5)
    assert uneven.named.observed == "scale=mean" and not uneven.named.exact
    normalization = uneven.named
    short = fingerprint_probe(loop, PROBES["short_window"], normalization=normalization)
    assert short.named.observed == "partial_window=k"
    one = [s for s in short.steps if len(s.micro_batches) == 1]
    assert one and all(abs(float(s.weights[0]) * 6 * 2 - 1) < 1e-5 for s in one)  # 1/(k * 6 rows), k = 2


@pytest.mark.filterwarnings("ignore:Detected call of")  # lr_scheduler.step() before optimizer.step(): the loop's bug
@pytest.mark.parametrize("function, expected", [
    ("exact", {}),
    ("nanogpt", {"uneven": "scale=mean", **dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch scale=mean"),
                 "short_window": "partial_window=k", "short_epoch": "partial_window=k"}),
    ("zero_grad_inside", {"uneven": "keep=last scale=mean",
                          **dict.fromkeys(TOKEN_PROBES, "keep=last normalize=micro_batch scale=mean"),
                          "short_window": "partial_window=k", "short_epoch": "partial_window=k", "clip": "clip=none"}),
    ("clip_and_schedule_inside", {**dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch"),
                                  "warmup": "scheduler_every=micro_batch", "clip": "clip_every=micro_batch"}),
])
def test_users_loops_are_named(function, expected):
    result = fingerprint(Custom(f"runner.experiments.examples.loops.{function}"))
    named = {r.probe.name: r.named.observed for r in result.results}
    assert named == {probe: expected.get(probe, EXACT[probe]) for probe in PROBES}
    assert all(r.named.exact == (r.probe.name not in expected) for r in result.results)


def odd_weights(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    """A loop whose last micro-batch of each window counts 1.6 times: no mode of the lab does that."""
    for _ in range(epochs):
        batches = list(loader)
        for start in range(0, len(batches), accumulation):
            window = batches[start:start + accumulation]
            total = sum(len(y) for _, y in window)
            for i, (x, y) in enumerate(window):
                (loss_fn(model(x), y) * len(y) / total * (1.6 if i == len(window) - 1 else 1.0)).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_a_pattern_with_no_name_is_reported_as_its_weights():
    uneven = fingerprint_probe(Custom("tests.test_fingerprint.odd_weights"), PROBES["uneven"])
    assert uneven.named.observed == ("no named normalisation: micro-batch 4 of 4 (6 rows) got 1.600x its exact "
                                     "weight")
    assert uneven.named.detail == "weights / exact: 1.000 1.000 1.000 1.600" and not uneven.named.exact


def closure_loop(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    """PyTorch Lightning's shape: the window's last micro-batch runs inside optimizer.step(closure)."""
    for _ in range(epochs):
        batches = list(loader)
        for start in range(0, len(batches), accumulation):
            window = batches[start:start + accumulation]
            for x, y in window[:-1]:
                (loss_fn(model(x), y) / accumulation).backward()
            x, y = window[-1]

            def closure():
                loss = loss_fn(model(x), y) / accumulation
                loss.backward()
                return loss

            optimizer.step(closure)
            optimizer.zero_grad()


def test_a_step_with_a_closure_is_observed_after_it_ran():
    uneven = fingerprint_probe(Custom("tests.test_fingerprint.closure_loop"), PROBES["uneven"])
    assert uneven.named.observed == "scale=mean" and [len(s.micro_batches) for s in uneven.steps] == [4, 4]


def foreign_inputs(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    for x, y in loader:
        loss_fn(model(torch.randn_like(x)), y).backward()


def raises(model, optimizer, loader, loss_fn, *, epochs, accumulation, scheduler=None, clip_norm=0.0):
    raise RuntimeError("my loop broke")


def test_a_loop_that_raises_or_forwards_other_data_is_one_line():
    with pytest.raises(LoopError, match="^loop=custom failed on probe uneven: RuntimeError: my loop broke$"):
        fingerprint_probe(Custom("tests.test_fingerprint.raises"), PROBES["uneven"])
    with pytest.raises(LoopError, match="^loop=custom on probe uneven: it forwarded 8 rows that are not the probe's"):
        fingerprint_probe(Custom("tests.test_fingerprint.foreign_inputs"), PROBES["uneven"])
    with pytest.raises(LoopError, match="does not take the loop's arguments"):
        Custom("tests.test_fingerprint.wrong_signature")


def wrong_signature(model, optimizer):
    pass


def test_clipping_is_simulated_as_torch_clips():
    """naming.clipped against torch.nn.utils.clip_grad_norm_ on the same gradients, per step and per micro-batch."""
    torch.manual_seed(0)
    basis, weights, clip = torch.randn(50, 3, dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), 0.4
    grad = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    running = torch.zeros(50, dtype=torch.float64)
    for i in range(3):
        running = running + weights[i] * basis[:, i]
        grad.grad = running.clone()
        torch.nn.utils.clip_grad_norm_([grad], clip)
        running = grad.grad.clone()
    assert torch.allclose(basis @ naming.clipped(basis, weights, clip, "micro_batch"), running)
    grad.grad = basis @ weights
    torch.nn.utils.clip_grad_norm_([grad], clip)
    assert torch.allclose(basis @ naming.clipped(basis, weights, clip, "step"), grad.grad)


def test_the_command_line_writes_the_fingerprint_and_its_picture(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_here("-m", "experiment=fingerprint", "backward.scale=size,mean", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pd.read_csv(sweep / record.FINGERPRINT, keep_default_na=False)
    assert tuple(rows.columns) == record.FINGERPRINT_COLUMNS
    assert list(rows["loop"].unique()) == ["runner backward.scale=size", "runner backward.scale=mean"]
    assert set(rows["dimension"]) == set(DIMENSIONS) and len(rows) == 2 * len(PROBES)
    mean = rows[(rows["loop"] == "runner backward.scale=mean") & (rows["probe"] == "uneven")].iloc[0]
    assert mean["observed"] == "scale=mean" and str(mean["exact"]) == "False" and "residual" in mean["evidence"]
    assert (sweep / record.FINGERPRINT_PICTURE).exists() and (sweep / record.FINGERPRINT_WEIGHTS).exists()
    assert "runner backward.scale=mean: not the exact fix: normalization" in result.stdout
    # make experiments' report tables it, bold where it is not the exact fix
    from runner.report import build_report

    report, _ = build_report(tmp_path)
    assert "## sweep" in report and "| runner backward.scale=mean (backward-lab 0.1.0) | **`scale=mean`** |" in report
    # ... and `make fingerprints` writes it into docs/fingerprint.md's generated block, the rest of the page kept
    from runner.analysis import fingerprints

    page = tmp_path / "page.md"
    page.write_text(f"intro\n{fingerprints.DOCS_BEGIN}\nthe previous table\n{fingerprints.DOCS_END}\noutro\n")
    assert fingerprints.main([str(sweep), "--docs", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "previous" not in text
    assert "| runner backward.scale=mean (backward-lab 0.1.0) | **`scale=mean`** |" in text and "Measured 20" in text
    docs = (Path(__file__).parent.parent / "docs" / "fingerprint.md").read_text()
    assert fingerprints.DOCS_BEGIN in docs and fingerprints.DOCS_END in docs


def test_bad_loops_are_one_line_and_leave_no_folder(tmp_path):
    for args, message in [
        (["loop=custom"], "error: loop._target_ is missing: expected loop._target_=module.function"),
        (["loop=custom", "loop._target_=nowhere.train"], "error: loop._target_=nowhere.train cannot be imported"),
        (["loop=deepspeed", "loop.zero_stage=3"], "error: loop.zero_stage=3 is not allowed: expected 0, 1 or 2"),
    ]:
        result = run_here("experiment=fingerprint", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    result = run_here("experiment=fingerprint", "loop=custom", "loop._target_=tests.test_fingerprint.raises",
                      f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "error: loop=custom failed on probe uneven: RuntimeError: my loop broke" \
        in result.stderr and not (tmp_path / "run" / record.FINGERPRINT).exists()


# What each framework's loop implements, as measured (docs/fingerprint.md): a probe missing here names the
# exact fix. Lightning and Accelerate divide each micro-batch's mean by k, the short window too (Lightning
# #19987); the Trainer hands a token loss the window's count and never divides a compute_loss_func by k.
FRAMEWORKS = {
    "lightning": {"uneven": "scale=mean", **dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch scale=mean"),
                  "short_window": "partial_window=k", "short_epoch": "partial_window=k"},
    "accelerate": {"uneven": "scale=mean", **dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch scale=mean"),
                   "short_window": "partial_window=k", "short_epoch": "partial_window=k"},
    "hf_trainer": {"uneven": "scale=none"},
}


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_each_framework_is_fingerprinted_as_measured(name):
    from runner.fingerprint.loops import build, missing_packages

    if missing_packages(name):
        pytest.skip(f"loop={name} needs {missing_packages(name)} (pip install '.[frameworks]')")
    result = fingerprint(build(name))
    named = {r.probe.name: r.named.observed for r in result.results}
    assert named == {probe: FRAMEWORKS[name].get(probe, EXACT[probe]) for probe in PROBES}
    assert all(r.residual < 1e-5 for r in result.results) and result.version
    # Each probe's epochs are the lab's own (a framework that opens an iterator it never reads skips none) ...
    assert all(min(mb.epoch for s in r.steps for mb in s.micro_batches) == 0 for r in result.results)
    # ... and where the framework is the exact fix on equal micro-batches it ends bit for bit where the lab's does.
    for r in result.results:
        if r.probe.name in BIT_FOR_BIT[name]:
            assert r.distance == 0, (name, r.probe.name, r.distance)


BIT_FOR_BIT = {"lightning": ("warmup", "clip"), "accelerate": ("warmup", "clip"),
               "hf_trainer": ("tokens", "policy", "packed")}


def test_a_framework_that_is_not_installed_is_one_line(monkeypatch):
    from runner.fingerprint import loops

    monkeypatch.setattr(loops, "installed_version", lambda package: "")
    with pytest.raises(LoopError, match=r'^loop=lightning needs lightning, which is not installed: pip install '
                                        r'"\.\[frameworks\]"'):
        loops.build("lightning")


@pytest.mark.parametrize("stage, expected", [
    (0, {"uneven": "scale=mean", **dict.fromkeys(TOKEN_PROBES, "normalize=micro_batch scale=mean"),
         "short_window": "partial_window=carry", "short_epoch": "partial_window=carry"}),
    (2, {probe: "not observed" for probe in PROBES if probe != "warmup"}),
])
def test_deepspeed_is_fingerprinted_as_measured(tmp_path, stage, expected):
    """DeepSpeed (a source package, not in the frameworks extra): its own process, since it initialises
    torch.distributed. ZeRO-0 scales each loss by 1/k and steps at micro_steps % k, across epochs; ZeRO-2 steps
    flat partitions, so .grad is empty when its optimizer steps and nothing is named from it."""
    from runner.fingerprint.loops import missing_packages
    from tests.conftest import run_cli

    if missing_packages("deepspeed"):
        pytest.skip("loop=deepspeed needs deepspeed (pip install --no-build-isolation deepspeed)")
    result = run_cli("experiment=fingerprint", "loop=deepspeed", f"loop.zero_stage={stage}",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "run" / record.FINGERPRINT, keep_default_na=False)
    named = dict(zip(rows["probe"], rows["observed"]))
    assert {p: n for p, n in named.items() if not n.startswith("not observed")} == \
        {p: expected.get(p, EXACT[p]) for p in PROBES if not expected.get(p, "").startswith("not observed")}
