"""The typed outcome of a job: ``LevelResult`` → ``CriterionResult`` → ``Certificate``, and its words.

Each type serialises (``to_dict``) to the §3 result object the service, the report page, the CLI and
the tests read: the same keys in the same order, the same values. Only what a JSON reader sees is
serialised; arrays a level's evaluation produced (per-sample losses, predictions) ride along for the
engine's own use (``more_data``, the benchmark) and are never written.

The guarantee sentence and the advice when nothing is certified (SPEC §1) are written here too:
they are functions of the result alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .planning import samples_needed
from .risks import SEQUENCE_RISKS


@dataclass
class LevelResult:
    """One sparsity level of one criterion's grid, as it was (or was not) tested.

    ``evaluated``: a test was run on it (False: the procedure stopped before it, or the plan skipped it).
    ``details``: what the level's candidate build chose (``bn_statistics``, ``finetune_loss``, ``finetune_step``).
    Not serialised: ``losses`` (per-sample, shape (n_samples,)), ``predictions`` (top-1, shape (n_samples,) or
    (n_samples, positions)), ``accuracy`` (of the candidate on the data it was evaluated on, with labels) and
    ``tested`` (False when no pass was spent: the dense level, whose risk relative to itself is 0).
    """

    sparsity: float
    evaluated: bool
    empirical_risk: float | None = None
    p_value: float | None = None
    upper_bound: float | None = None
    rejected: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    losses: np.ndarray | None = field(default=None, repr=False, compare=False)
    predictions: np.ndarray | None = field(default=None, repr=False, compare=False)
    accuracy: float | None = field(default=None, compare=False)
    tested: bool = field(default=False, compare=False)

    @classmethod
    def skipped(cls, sparsity: float) -> "LevelResult":
        """A level no test reached (the procedure had stopped, or the plan left it out)."""
        return cls(sparsity=sparsity, evaluated=False)

    def to_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "empirical_risk": self.empirical_risk, "p_value": self.p_value,
                "rejected": self.rejected, "evaluated": self.evaluated, "upper_bound": self.upper_bound,
                **self.details}


def level_details(info: dict[str, Any] | None) -> dict[str, Any]:
    """What a level's candidate build chose, for its row of the result (BN statistics, fine-tuning loss)."""
    if not info:
        return {}
    out: dict[str, Any] = {}
    if "bn_statistics" in info:
        out["bn_statistics"] = info["bn_statistics"]
    if info.get("finetune_loss") is not None:
        out["finetune_loss"] = round(float(info["finetune_loss"]), 6)  # held-out loss of the kept weights
        out["finetune_step"] = info.get("finetune_step")  # the step kept (0: fine-tuning did not help)
    return out


@dataclass
class CriterionResult:
    """One criterion's grid tested at its share ``delta`` of δ; ``plan``: the planned procedure's D_tune plan."""

    criterion: str
    delta: float
    certified_sparsity: float
    levels: list[LevelResult]
    plan: dict[str, Any] | None = None

    @property
    def certified(self) -> bool:
        return self.certified_sparsity > 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {"criterion": self.criterion, "delta": self.delta, "certified_sparsity": self.certified_sparsity,
               "certified": self.certified, "levels": [lvl.to_dict() for lvl in self.levels]}
        if self.plan is not None:
            out["plan"] = self.plan
        return out


@dataclass
class Certificate:
    """The outcome of ``certify``: ``result`` is the §3 result object (JSON-ready), built once from the fields.

    ``criteria[best]`` is the winning criterion; ``levels`` in the result are its levels. Fields named like
    the result's keys hold their values; the rest of the result is derived (``certified``, ``criterion``,
    ``levels``). ``timings`` are the raw seconds (the result holds them rounded).
    """

    criteria: list[CriterionResult]
    best: int
    epsilon: float
    delta: float
    risk: str
    bound: str
    bound_requested: str
    procedure: str
    scope: str
    n_calibration: int
    n_tune: int
    seed: int
    dense_accuracy: float | None
    pruned_accuracy: float | None
    prunable_parameters: int
    prunable_weights: dict[str, Any]
    zeroed_parameters: int
    total_parameters: int
    layers: list[dict[str, Any]]
    bn_recalibration: str
    device: str
    precision: str
    precision_requested: str
    evaluator: dict[str, Any]
    levels_evaluated: int
    levels_evaluated_tune: int
    reconstruction: dict[str, Any] | None
    bn_statistics: dict[str, Any] | None
    finetune: dict[str, Any] | None
    more_data: dict[str, Any] | None
    bound_note: str | None
    pattern: str | None
    pattern_layers: list[str] | None
    guarantee: str
    artifact_sha256: str | None = None
    artifact_bytes: int | None = None  # only in the result when an artifact was written
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def winner(self) -> CriterionResult:
        return self.criteria[self.best]

    @property
    def certified_sparsity(self) -> float:
        return float(self.result["certified_sparsity"])

    @property
    def certified(self) -> bool:
        return self.winner.certified

    @functools.cached_property
    def result(self) -> dict[str, Any]:
        """The §3 result object (one dict, built on first use: changes to it stay)."""
        criteria = [c.to_dict() for c in self.criteria]
        out: dict[str, Any] = {
            "certified_sparsity": self.winner.certified_sparsity,
            "certified": self.winner.certified,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "risk": self.risk,
            "bound": self.bound,
            "bound_requested": self.bound_requested,
            "procedure": self.procedure,
            "criterion": self.winner.criterion,
            "scope": self.scope,
            "n_calibration": self.n_calibration,
            "n_tune": self.n_tune,
            "seed": self.seed,
            "dense_accuracy": self.dense_accuracy,
            "pruned_accuracy": self.pruned_accuracy,
            "prunable_parameters": self.prunable_parameters,
            "prunable_weights": self.prunable_weights,  # candidates vs all weight matrices (calibration.discovery)
            "zeroed_parameters": self.zeroed_parameters,
            "total_parameters": self.total_parameters,
            "levels": criteria[self.best]["levels"],
            "criteria": criteria,
            "layers": self.layers,
            "bn_recalibration": self.bn_recalibration,
            "device": self.device,
            "precision": self.precision,
            "precision_requested": self.precision_requested,
            "evaluator": self.evaluator,
            "levels_evaluated": self.levels_evaluated,
            "levels_evaluated_tune": self.levels_evaluated_tune,  # planned: levels D_tune evaluated to plan
            "reconstruction": self.reconstruction,
            "bn_statistics": self.bn_statistics,
            "finetune": self.finetune,
            "more_data": self.more_data,
            "bound_note": self.bound_note,
            "pattern": self.pattern,
            "pattern_layers": self.pattern_layers,
            "guarantee": self.guarantee,
            "artifact_sha256": self.artifact_sha256,
        }
        if self.artifact_bytes is not None:
            out["artifact_bytes"] = self.artifact_bytes
        out["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(self.result)


# ----------------------------------------------------------------------------- the result's words


def guarantee_sentence(*, certified: bool, sparsity: float, risk: str, epsilon: float, delta: float,
                       n_cal: int, criterion: str, bound: str | None = None, advice: str | None = None) -> str:
    """The guarantee in plain words (SPEC §1), for every report."""
    what = {
        "accuracy_drop": f"its accuracy is at most {epsilon:.4g} below the dense model's (accuracy drop ≤ {epsilon:.4g})",
        "disagreement": f"its top-1 prediction differs from the dense model's on at most a {epsilon:.4g} fraction of inputs",
        "error_rate": f"its error rate is at most {epsilon:.4g}",
        "token_disagreement": (f"the expected fraction of a sample's (unmasked) token positions where its top-1 "
                               f"prediction differs from the dense model's is at most {epsilon:.4g}"),
        "token_accuracy_drop": (f"the expected drop of a sample's token accuracy (over its labelled, unmasked "
                                f"positions) below the dense model's is at most {epsilon:.4g}"),
    }[risk]
    if risk in SEQUENCE_RISKS:
        how = {"wsr": "a Waudby-Smith–Ramdas betting bound", "hb": "the Hoeffding–Bentkus bound (factor e)"}
        what += (f" (a bounded per-sample loss, tested with {how.get(bound or 'wsr', bound)}, valid for "
                 "bounded losses)")
    assumption = (f"over the draw of the {n_cal} calibration samples, assuming they are i.i.d. draws from "
                  "the distribution the model will be deployed on")
    if certified:
        return (f"With probability at least {1 - delta:.4g} {assumption}, the model pruned to "
                f"{sparsity:.2%} sparsity ({criterion}) satisfies: {what}.")
    return (f"No sparsity level could be certified at ε = {epsilon:.4g}, δ = {delta:.4g} with {n_cal} "
            "calibration samples: the dense model is returned unchanged (certified: false). "
            + (advice or "More calibration data, a larger ε or a finer grid at low sparsity may help."))


def failure_advice(levels: list[dict[str, Any]], epsilon: float) -> str:
    """What would help when nothing is certified, from the first pruned level tested (its cause, not a list)."""
    first = next((lvl for lvl in levels if lvl["evaluated"] and lvl["sparsity"] > 0.0), None)
    if first is None:
        return "No pruned level was tested: add levels above 0 to 'sparsities'."
    risk, where = first["empirical_risk"], f"the first level tested ({first['sparsity']:.4g})"
    if risk is not None and risk > epsilon:
        if first.get("bn_statistics") in ("reestimated", "blended") and first["sparsity"] <= 0.05:
            # so little pruned that the statistics, not the zeros, are the likely cause
            return (f"At {where} the observed risk {risk:.4g} already exceeds ε with BatchNorm statistics "
                    f"{first['bn_statistics']} on the tuning split: more tuning data (tune_fraction), "
                    "'bn_recalibration': false, or a finer grid at low sparsity may help.")
        return (f"At {where} the observed risk {risk:.4g} already exceeds ε: a finer grid at low sparsity, a larger "
                "ε, or better candidates ('reconstruct', 'finetune') may help; more calibration data would not.")
    return (f"At {where} the observed risk {risk:.4g} is within ε but {first.get('p_value', float('nan')):.3g} is "
            "not a small enough p-value: more calibration data (see more_data) or a larger ε may help.")


def method_label(criterion: str, cfg: Any, *, reconstructed: bool | tuple[int, int], precision: str,
                 channels_last: bool, on_cuda: bool = False, candidates: dict[str, Any] | None = None,
                 finetune: dict[str, Any] | None = None, bn: dict[str, Any] | None = None) -> str:
    """How the candidates were made and run, for the guarantee sentence (reduced precision: the certificate is
    for the model run that way, and there the memory layout changes the rounding too). ``cfg``: the job's
    ``CertifyConfig`` (its ``scope`` and ``pattern``)."""
    parts = [f"{criterion} scores, {cfg.scope} scope"]
    if candidates is not None:  # what the sparsity is a fraction of
        parts.append(f"candidates: {candidates['count']} of the model's {candidates['of_count']} weight matrices, "
                     f"{candidates['fraction_params']:.1%} of their parameters")
    if cfg.pattern:
        parts.append(f"{cfg.pattern} semi-structured pattern")
    if isinstance(reconstructed, tuple):  # (layers reconstructed, candidate layers)
        if reconstructed[0]:
            parts.append(f"weights of {reconstructed[0]} of {reconstructed[1]} candidate layers reconstructed "
                         "on the tuning split")
    elif reconstructed:
        parts.append("weights reconstructed on the tuning split")
    if bn is not None:
        parts.append(("BatchNorm statistics re-estimated on the tuning split" if bn["mode"] == "reestimate" else
                      "BatchNorm statistics per level the better of dense, re-estimated and blended on a held-out "
                      "half of the tuning split") + (f" (in {bn['math'].upper()} math)" if bn.get("math") else ""))
    if finetune is not None:
        parts.append(f"kept weights fine-tuned for up to {finetune['steps']} steps on the tuning split "
                     + ("per level, each level continuing from the one below it " if finetune.get("chain") else "")
                     + f"({finetune['loss_description']}; the step kept by a held-out part of it)")
    if precision != "fp32" or on_cuda:
        # On CUDA the layout changes which kernels run (and, below fp32, the rounding): name it always.
        layout = "channels-last (NHWC)" if channels_last else "NCHW"
        parts.append(f"run in {precision} with {layout} memory layout" if on_cuda else f"run in {precision}")
    return "; ".join(parts)


def more_data(best: CriterionResult, *, bound: str, risk: str, epsilon: float, alpha: float) -> dict[str, Any] | None:
    """For the first tested level above λ̂ that was not rejected (its losses kept: p > α): the calibration size
    that would likely certify it at its observed risk (``planning.samples_needed``; an estimate, not a guarantee)."""
    levels = best.levels
    above = max((j for j, lvl in enumerate(levels) if lvl.rejected), default=-1)
    nxt = next((j for j in range(above + 1, len(levels)) if levels[j].losses is not None), None)
    if nxt is None:
        return None
    losses = levels[nxt].losses
    assert losses is not None
    needed = samples_needed(bound, risk, losses, epsilon, alpha)
    return {"sparsity": float(levels[nxt].sparsity), "empirical_risk": levels[nxt].empirical_risk,
            "p_value": levels[nxt].p_value, "n_calibration": int(losses.shape[0]),
            "n_calibration_needed": needed,
            "note": ("An estimate for planning: the calibration samples that would likely certify this level if "
                     "its losses kept the frequencies seen here. Not part of the guarantee."
                     if needed is not None else
                     "At the risk observed here, more calibration data alone would not certify this level.")}


def bound_note(bound: str, risk: str, epsilon: float) -> str | None:
    """A warning in the result when the chosen bound is known to certify little for this risk."""
    if bound == "hb" and risk == "accuracy_drop":
        return (f"Hoeffding–Bentkus on accuracy_drop tests (D + 1)/2 against (1 + ε)/2 with a factor e: at "
                f"ε = {epsilon:.4g} it is close to vacuous (at n = 2000, ε = 0.01 it needs b − c ≤ −62: pruning "
                "must fix far more errors than it makes). 'paired_exact' (the default) certifies much more.")
    return None


__all__ = ["Certificate", "CriterionResult", "LevelResult", "bound_note", "failure_advice",
           "guarantee_sentence", "level_details", "method_label", "more_data"]
