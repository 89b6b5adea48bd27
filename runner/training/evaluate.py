"""Held-out evaluation at the end of a run: average precision for binary labels, accuracy for
classes, mean squared error for a regression target, next-token accuracy (and the mean loss per
token) for sequences."""
from __future__ import annotations

from typing import Dict

import torch

from runner.components.data import IGNORE_INDEX, labels_of
from runner.components.losses import cosine_similarity, logits_of


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro average precision over label columns that have a positive (sklearn's definition:
    the mean of precision at each positive, ranked by descending score)."""
    scores, labels = scores.reshape(len(scores), -1), labels.reshape(len(labels), -1)
    per_column = []
    for col in range(scores.shape[1]):
        y = labels[:, col][torch.argsort(scores[:, col], descending=True, stable=True)].double()
        positives = y.sum()
        if positives == 0:
            continue
        precision_at_k = torch.cumsum(y, 0) / torch.arange(1, len(y) + 1, dtype=torch.float64)
        per_column.append(float((precision_at_k * y).sum() / positives))
    return sum(per_column) / len(per_column) if per_column else float("nan")


@torch.no_grad()
def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets, kind: str) -> Dict[str, float]:
    """Metrics on the held-out split; the first key is the run's headline `eval_metric`."""
    if len(inputs) == 0:
        return {}
    was_training = model.training
    model.eval()
    try:
        outputs = model(inputs)
    finally:
        model.train(was_training)
    if kind == "multilabel":
        return {"average_precision": average_precision(outputs.cpu(), targets.cpu())}
    if kind == "multiclass":
        logits = outputs["stage2"] if isinstance(outputs, dict) else outputs
        return {"accuracy": float((logits.argmax(1) == targets).double().mean())}
    if kind == "regression":
        return {"mse": float(torch.mean((outputs - targets).double() ** 2))}
    if kind == "sequence":  # next-token labels; padding (-100) is not scored
        targets = labels_of(targets)  # packed rows' targets also carry their documents
        scored = targets != IGNORE_INDEX
        logits = logits_of(outputs)[scored]  # model=moe outputs a dict with its router's statistics
        return {"token_accuracy": float((logits.argmax(-1) == targets[scored]).double().mean()),
                "token_loss": float(torch.nn.functional.cross_entropy(logits.double(), targets[scored]))}
    if kind == "rollout":  # data=rollouts: does the policy favour the completions with a positive advantage?
        labels = targets["labels"]
        scored = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits_of(outputs).double(), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        gain = (targets["advantages"].double()[:, None] * (logp - targets["old_logprobs"].double()))[scored]
        return {"advantage_weighted_logprob_gain": float(gain.mean())}
    if kind == "preference":  # data=preference_pairs: the implicit reward's margin of chosen over rejected
        labels = targets["labels"]
        logp = torch.log_softmax(logits_of(outputs).double(), dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        gain = (logp * (labels != IGNORE_INDEX)).sum(dim=-1) - targets["ref_logps"].double()
        margin = gain[:, 0] - gain[:, 1]
        return {"logprob_margin_gain": float(margin.mean()), "preference_accuracy": float((margin > 0).double().mean())}
    if kind == "retrieval":  # embeddings (N, 2, dim): is query i's nearest key (cosine, as infonce) key i?
        nearest = cosine_similarity(outputs[:, 0].double(), outputs[:, 1].double()).argmax(1)
        return {"retrieval_accuracy": float((nearest == torch.arange(len(nearest), device=nearest.device))
                                            .double().mean())}
    if kind == "multitask":
        return {
            "average_precision": average_precision(outputs["cls"].cpu(), targets["cls"].cpu()),
            "mse": float(torch.mean((outputs["reg"] - targets["reg"]).double() ** 2)),
        }
    raise ValueError(f"unknown task kind {kind!r}")
