"""One loop over every probe -> its fingerprint: one row per probe and the dimension it names.

For each probe, the lab's exact fix runs twice (the runner loop with its exact modes, in float32 and
float64): the end parameters' distance of the loop under test from the float32 run is reported in units
of the float32 run's own drift from float64, so an exact loop reads about 1 or less, a bug far more.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from runner.components.losses import TokenLoss, offers
from runner.config.schema import GROUPS, ConfigError, first_line
from runner.fingerprint import naming
from runner.fingerprint.loops import Loop, LoopError, ProbeLoader, Runner, Session
from runner.fingerprint.observe import NotTheLabsData, Observer, Stream
from runner.fingerprint.probes import CLIP_FRACTION, PROBES, Probe
from runner.fingerprint.weights import Basis, Solved

# What makes the lab's own loop exact whatever the command line chose (the reference runs).
EXACT_MODES = ("backward=accumulate",)
# The command line's keys that choose the lab's own loop's modes (loop=runner); the probes set the rest.
MODE_KEYS = ("backward", "loss.normalize", "loss.count_window", "loss.boundaries", "loss.term_normalize",
             "optim.scheduler_every", "optim.clip_every", "seed")


@dataclass
class Row:
    """A row of fingerprint.csv (runner.recording.record.FINGERPRINT_COLUMNS)."""

    loop: str
    version: str
    probe: str
    dimension: str
    observed: str
    exact: bool
    evidence: str


@dataclass
class ProbeResult:
    probe: Probe
    named: naming.Named
    steps: List[Solved] = field(default_factory=list)
    residual: Optional[float] = None  # the largest over the steps
    distance: Optional[float] = None  # end parameters from the exact run, in float32 drifts
    clip_norm: float = 0.0  # the clip the probe set (0: none)

    def exact_weights(self, step: Solved) -> torch.Tensor:
        """The exact fix's weights for a step's micro-batches: the window's mean (by rows or tokens), clipped
        once per step where the probe clips."""
        m = len(step.micro_batches)
        exact = next(iter(naming.rules(self.probe.tokens).values()))(step.micro_batches, m, self.probe.accumulation)
        return naming.clipped(step.basis, exact, self.clip_norm, "step") if self.clip_norm else exact

    def evidence(self) -> str:
        parts = []
        if self.named.error is not None:
            parts.append(f"weight error {self.named.error:.1e} against {self.named.observed}"
                         if self.named.dimension != "schedule" else f"learning-rate error {self.named.error:.1e}")
        if self.named.detail:
            parts.append(self.named.detail)
        if self.residual is not None:
            parts.append(f"residual {self.residual:.1e}")
        if self.distance is not None:
            parts.append(f"end parameters {self.distance:.3g} float32 drifts from the exact run")
        return "; ".join(parts)


@dataclass
class Fingerprint:
    loop: str
    version: str
    results: List[ProbeResult]

    def rows(self) -> List[Row]:
        return [Row(self.loop, self.version, r.probe.name, r.named.dimension, r.named.observed, r.named.exact,
                    r.evidence()) for r in self.results]


def mode_overrides(overrides: Sequence[str]) -> List[str]:
    """The command line's overrides that choose the lab's own loop's modes (MODE_KEYS)."""
    keys = [(o, o.lstrip("+~").partition("=")[0]) for o in overrides]
    return [o for o, key in keys if key.split(".")[0] == "backward" or key in MODE_KEYS]


# The config groups: an override KEY=VALUE with one of these keys chooses an option; any other sets a key.
CHOICES = (*GROUPS, "precision")


def _compose(probe: Probe, modes: Sequence[str], extra: Sequence[str] = ()):
    """What `python -m runner` would train for the probe under `modes` (the probe's own keys win), composed as
    runner.api.compose does; Hydra composes each probe's group choices once (runner.config.compose)."""
    from runner import jobs
    from runner.config.compose import compose_merged

    own = probe.overrides() + tuple(extra)
    keys = {o.partition("=")[0] for o in own}
    overrides = [*(m for m in modes if m.lstrip("+~").partition("=")[0] not in keys), *own]
    chosen = [o for o in overrides if o.partition("=")[0] in CHOICES]
    cfg = compose_merged(chosen, [o for o in overrides if o not in chosen])
    return jobs.prepare(cfg, cfg.hydra).training


def _count(training):
    loss_fn = training.loss_fn
    return loss_fn.count_tokens if offers(loss_fn, TokenLoss) else (lambda targets: targets.shape[0])


def _stream(training) -> Stream:
    return Stream(training.batches.loader, _count(training))


def _final(training) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in training.model.parameters()])


@functools.lru_cache(maxsize=64)  # every loop's probe compares with the same exact runs
def _run_exact(probe: Probe, extra: Tuple[str, ...], seed: int, dtype: Optional[str] = None) -> torch.Tensor:
    training = _compose(probe, [*EXACT_MODES, f"seed={seed}", *([f"precision={dtype}"] if dtype else [])], extra)
    loader = ProbeLoader(_stream(training))
    Runner().train(Session(training, loader, probe.epochs, probe.accumulation, 0.0, probe.tokens))
    return _final(training)


@functools.lru_cache(maxsize=32)  # never trained: the basis copies its model, the loops compare with it
def _reference(probe: Probe, extra: Tuple[str, ...], seed: int):
    """The exact fix in float64 on the probe: its model is the basis's, its loss sums each micro-batch's."""
    return _compose(probe, [*EXACT_MODES, f"seed={seed}", "precision=float64"], extra)


@functools.lru_cache(maxsize=16)
def _clip_norm(probe: Probe, seed: int) -> float:
    """CLIP_FRACTION of the exact first window's gradient norm at the initial parameters (float64)."""
    training = _reference(probe, (), seed)
    stream = _stream(training)
    first = stream.epoch(0)[:probe.accumulation]
    basis = Basis(training.model, training.loss_fn).gradients(
        [p.detach().to(torch.float64) for p in training.model.parameters()], first)
    total = sum(mb.count for mb in first)
    return CLIP_FRACTION * float((basis.sum(dim=1) / total).norm())


def fingerprint_probe(loop: Loop, probe: Probe, modes: Sequence[str] = (), seed: int = 0,
                      normalization: Optional[naming.Named] = None) -> ProbeResult:
    """Run `loop` on `probe` under the hooks, solve each step's weights and name the probe's dimension.
    `normalization`: the examples' normalisation named by the uneven probe (the window and clipping
    probes name theirs against it). Raises LoopError where the loop itself fails."""
    extra = (f"optim.clip_norm={_clip_norm(probe, seed):.10g}",) if probe.clipped else ()
    chosen = [*(modes if loop.modes else ()), f"seed={seed}"]
    if not loop.modes or not any(m.startswith("backward=") for m in chosen):
        chosen.insert(0, "backward=accumulate")
    try:
        training = _compose(probe, chosen, extra)
    except ConfigError as exc:  # the lab refuses this mode on this probe (drop with an epoch shorter than k)
        return ProbeResult(probe, naming.Named(probe.dimension, f"not run: {exc}", False))
    reference = _reference(probe, extra, seed)
    stream = Stream(training.batches.loader, _count(reference))  # the exact count, whatever the loop's loss counts
    stream.epoch(probe.epochs)  # the runner's carried windows draw one epoch ahead
    session = Session(training, ProbeLoader(stream), probe.epochs, probe.accumulation,
                      training.config.optim.clip_norm, probe.tokens)
    basis = Basis(reference.model, reference.loss_fn, terms=probe.terms)
    with Observer(training.model, session.optimizer, stream) as observer:
        try:
            loop.train(session)
        except LoopError:
            raise
        except NotTheLabsData as exc:
            raise LoopError(f"loop={loop.name} on probe {probe.name}: {exc}") from None
        except Exception as exc:
            raise LoopError(f"loop={loop.name} failed on probe {probe.name}: {type(exc).__name__}: "
                            f"{first_line(exc)}") from exc
    steps = [basis.solve(seen, stream.positions) for seen in observer.steps]
    named = _name(probe, steps, stream, training, normalization)
    float32 = _run_exact(probe, extra, seed)
    drift = float((float32 - _run_exact(probe, extra, seed, "float64")).norm())
    distance = float((_final(training) - float32).norm()) / drift if drift > 0 else None
    residual = max((s.residual for s in steps), default=None)
    return ProbeResult(probe, named, steps, residual, distance, training.config.optim.clip_norm)


def _name(probe: Probe, steps: List[Solved], stream: Stream, training, normalization) -> naming.Named:
    k = probe.accumulation
    if not steps:
        return naming.Named(probe.dimension, "not named: the loop made no optimizer step", False)
    if probe.dimension != "schedule" and all(float(s.grad.norm()) == 0 for s in steps):
        # DeepSpeed ZeRO-1/2: the optimizer steps flat partitions that hold the gradient, not the model's .grad
        return naming.Named(probe.dimension, "not observed: .grad was empty at every optimizer step (the loop keeps "
                                             "the gradient elsewhere)", False)
    if probe.dimension == "normalization":
        return naming.terms(steps, k) if probe.terms else naming.normalization(steps, k, probe.tokens)
    rule = naming.rules(probe.tokens).get(normalization.observed) if normalization is not None else None
    if probe.dimension == "window":
        return naming.window(steps, k, stream.micro_batches_per_epoch, rule)
    if probe.dimension == "schedule":
        scheduler = training.schedulers[0]
        return naming.schedule(steps, lambda i: scheduler.base_lrs[0] * scheduler.lr_lambdas[0](i))
    return naming.clipping(steps, k, training.config.optim.clip_norm, rule)


def fingerprint(loop: Loop, modes: Sequence[str] = (), seed: int = 0,
                probes: Sequence[str] = tuple(PROBES)) -> Fingerprint:
    """The loop's fingerprint over `probes` (the uneven probe first: the others name against it)."""
    ordered = sorted(probes, key=lambda name: name != "uneven")
    results: List[ProbeResult] = []
    normalization = None
    for name in ordered:
        result = fingerprint_probe(loop, PROBES[name], modes, seed, normalization)
        if name == "uneven":
            normalization = result.named
        results.append(result)
    order = list(PROBES)
    results.sort(key=lambda r: order.index(r.probe.name))
    return Fingerprint(loop.name, loop.version(), results)

