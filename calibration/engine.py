"""The evaluation engine: dense once → levels in ascending order → losses → p-values → stop.

Data flows one way (MAPIE's split): predictions → per-sample losses (``risks``) → p-values
(``p_values``) → family-wise procedure (``procedures``) → certified level. The split into
D_tune / D_cal happens once, first; scores, BN re-estimation and pseudo-labels see D_tune only,
p-values see D_cal only, so the Learn-then-Test guarantee of SPEC §1 holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import batchnorm
from .config import LABELLED_RISKS, CertifyConfig, validate_config
from .criteria import ScoreContext, get_criterion
from .data import CalibrationSet, check_labels, load_calibration, split_tune_cal
from .errors import CancelledError, ConfigError, DataError, ModelError, exception_summary
from .fast_eval import Predictor, cudnn_benchmark_rule, effective_precision
from .inputs import ModelInputs, bind_inputs, call, describe_batch, gather, select_output
from .candidates import BatchNormChooser, CandidateBuilder, CandidateState
from .finetune import SOFT_TARGET_ELEMENTS, Finetuner, dense_targets
from .masks import NestedMasks, restore
from .model import batchnorm_modules, discover_prunable, is_exported, load_model, resolve_device, save_model
from .p_values import p_value, resolve_bound, upper_confidence_bound
from .patterns import PatternMasks
from .planned_sequence import PlannedSequence, plan_sequence, predict_pass
from .planning import samples_needed
from .procedures import get_procedure, split_delta
from .reconstruct import Reconstructor
from .risks import SEQUENCE_RISKS, empirical_risk, per_sample_losses, prediction_accuracy, sequence_mask_name


@dataclass(frozen=True)
class Progress:
    """One progress event: ``stage`` in loading|scoring|dense|testing|saving, ``done`` of ``total``."""

    stage: str
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


@dataclass
class Certificate:
    """The outcome: ``result`` is the §3 result object (JSON-ready)."""

    result: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.result)

    @property
    def certified_sparsity(self) -> float:
        return float(self.result["certified_sparsity"])


ProgressFn = Callable[[Progress], None]


@contextlib.contextmanager
def evaluation_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Evaluate in the precision the artifact will run at; fp32 (exact) unless asked otherwise."""
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        if precision in ("bf16", "fp16") and device.type == "cuda":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            # No weight-cast cache: weights change in place between levels.
            with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32


@torch.no_grad()
def predict(module: torch.nn.Module, x: torch.Tensor, batch_size: int,
            should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Top-1 predictions (n_samples,) int64 on x's device."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        if should_stop is not None and should_stop():
            raise CancelledError()
        logits = select_output(call(module, x[start:start + batch_size]))
        out.append(logits.argmax(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=x.device)


@torch.no_grad()
def dense_logits_checked(module: torch.nn.Module, x: torch.Tensor, batch_size: int,
                         should_stop: Callable[[], bool] | None,
                         predictor: Predictor | None = None, *, sequence: bool = False) -> tuple[torch.Tensor, int]:
    """Dense predictions over all samples, checking the model's contract (logits (N, classes), finite).

    With ``predictor`` the dense pass runs exactly as every level's pass will (same batches, same
    CUDA graph, same precision), so λ = 0 and the levels are compared like for like.
    """
    predictor = predictor if predictor is not None else Predictor(module, batch_size, device=x.device)
    n_classes = -1

    def failed(xb: torch.Tensor, exc: BaseException) -> None:
        first = exception_summary(exc)
        if "same device" in first and x.device.type == "cuda":
            # torch.jit.trace records tensors a forward creates (masks, position ids) with the device it
            # was traced on: a model traced on the CPU then cannot run on a GPU.
            advice = ("The archive holds tensors fixed to the CPU, which happens when a model is traced with "
                      "torch.jit.trace on the CPU: trace it on a CUDA device (model.cuda() and CUDA example "
                      "inputs), script it with torch.jit.script, or run the job with device 'cpu'.")
        else:
            advice = ("Check that the data's input shape and dtype match what the model expects (integer arrays "
                      "are passed as int64, floating ones as float32).")
        raise ModelError(
            f"The model failed on a batch of inputs ({describe_batch(xb)}): {first}. {advice}",
            code="model_forward_failed",
        ) from exc

    def check(xb: torch.Tensor, logits: Any) -> None:
        nonlocal n_classes
        rows_match = isinstance(logits, torch.Tensor) and logits.shape[0] == xb.shape[0]
        if rows_match and logits.dim() == 3 and not sequence:
            raise ModelError(
                f"The model returns logits of shape {list(logits.shape)} (batch, positions, vocabulary): a sequence "
                "model. Use risk 'token_disagreement' (no labels) or 'token_accuracy_drop' (labels (N, T)).",
                code="model_bad_output")
        if not (rows_match and logits.dim() == (3 if sequence else 2)):
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            need = ("The sequence risks need logits of shape (batch, positions, vocabulary)" if sequence
                    else "The model must return logits of shape (batch, classes)")
            raise ModelError(f"{need}; for a batch of {xb.shape[0]} it returned {shape}.",
                             code="model_bad_output")
        if logits.shape[-1] < 2:
            raise ModelError(f"The model returns {logits.shape[-1]} class score(s); at least 2 are needed.",
                             code="model_bad_output")
        if not torch.isfinite(logits).all():
            raise ModelError("The dense model returns NaN or infinite logits on the calibration data.",
                             code="model_output_not_finite")
        n_classes = logits.shape[-1]

    preds = predictor.predict(x, should_stop, check=check, on_error=failed)
    return preds, n_classes


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


def _method_label(criterion: str, cfg: CertifyConfig, *, reconstructed: bool | tuple[int, int], precision: str,
                  channels_last: bool, on_cuda: bool = False, candidates: dict[str, Any] | None = None,
                  finetune: dict[str, Any] | None = None, bn: dict[str, Any] | None = None) -> str:
    """How the candidates were made and run, for the guarantee sentence (reduced precision: the certificate is
    for the model run that way, and there the memory layout changes the rounding too)."""
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
        parts.append("BatchNorm statistics re-estimated on the tuning split" if bn["mode"] == "reestimate" else
                     "BatchNorm statistics per level the better of dense, re-estimated and blended on a held-out "
                     "half of the tuning split")
    if finetune is not None:
        parts.append(f"kept weights fine-tuned for up to {finetune['steps']} steps on the tuning split "
                     + ("per level, each level continuing from the one below it " if finetune.get("chain") else "")
                     + f"({finetune['loss_description']}; the step kept by a held-out part of it)")
    if precision != "fp32" or on_cuda:
        # On CUDA the layout changes which kernels run (and, below fp32, the rounding): name it always.
        layout = "channels-last (NHWC)" if channels_last else "NCHW"
        parts.append(f"run in {precision} with {layout} memory layout" if on_cuda else f"run in {precision}")
    return "; ".join(parts)


def _more_data(best: dict[str, Any], grid: Any, failed_losses: dict[tuple[str, int], np.ndarray], *, bound: str,
               risk: str, epsilon: float, alpha: float) -> dict[str, Any] | None:
    """For the first tested level above λ̂ that was not rejected: the calibration size that would likely
    certify it at its observed risk (``planning.samples_needed``; an estimate, not a guarantee)."""
    levels = best["levels"]
    above = max((j for j, lvl in enumerate(levels) if lvl["rejected"]), default=-1)
    nxt = next((j for j in range(above + 1, len(levels)) if (best["criterion"], j) in failed_losses), None)
    if nxt is None:
        return None
    losses = failed_losses[(best["criterion"], nxt)]
    needed = samples_needed(bound, risk, losses, epsilon, alpha)
    return {"sparsity": float(grid[nxt]), "empirical_risk": levels[nxt]["empirical_risk"],
            "p_value": levels[nxt]["p_value"], "n_calibration": int(losses.shape[0]),
            "n_calibration_needed": needed,
            "note": ("An estimate for planning: the calibration samples that would likely certify this level if "
                     "its losses kept the frequencies seen here. Not part of the guarantee."
                     if needed is not None else
                     "At the risk observed here, more calibration data alone would not certify this level.")}


def _bound_note(bound: str, risk: str, epsilon: float) -> str | None:
    """A warning in the result when the chosen bound is known to certify little for this risk."""
    if bound == "hb" and risk == "accuracy_drop":
        return (f"Hoeffding–Bentkus on accuracy_drop tests (D + 1)/2 against (1 + ε)/2 with a factor e: at "
                f"ε = {epsilon:.4g} it is close to vacuous (at n = 2000, ε = 0.01 it needs b − c ≤ −62: pruning "
                "must fix far more errors than it makes). 'paired_exact' (the default) certifies much more.")
    return None


def expected_batch_forwards(cfg: CertifyConfig, n_cal: int, n_tune: int, use_bn: bool, n_weights: int) -> int:
    """Batch forwards a job runs at most (every level evaluated): the dense pass on both splits, then per
    level one pass over D_cal and, with BN re-estimation, one over D_tune. From sizes fixed before D_cal is
    looked at; decides whether cuDNN's autotuner can pay for itself (``fast_eval.cudnn_benchmark_rule``)."""
    bs = max(1, cfg.batch_size)
    cal, tune = -(-n_cal // bs), -(-n_tune // bs)
    levels = (len(cfg.sparsities) if cfg.pattern is None else n_weights + 1) * len(cfg.criterion)
    return cal + tune + levels * (cal + (tune if use_bn else 0))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _candidate_builder(cfg: CertifyConfig, module: torch.nn.Module, params: list[torch.Tensor],
                       originals: list[torch.Tensor] | None,
                       reconstructor: Reconstructor | None, predictor: Predictor, x_tune: Any, *, use_bn: bool,
                       risk: str, dense_tune_np: np.ndarray, y_tune: torch.Tensor | None,
                       y_tune_np: np.ndarray | None, mask_tune: np.ndarray | None) -> CandidateBuilder:
    """How this job's candidates are built from D_tune (calibration.candidates): BN statistics, fine-tuning."""
    bn = None
    if use_bn:
        # Traced graphs bake eval mode into their BN calls: re-estimate through a rewritten copy (momentum 1).
        train_forward = batchnorm.train_mode_forward(module)

        def bn_forward(xb: Any) -> Any:
            return predictor.forward(xb, train_forward)

        def check_risk(rows: np.ndarray, preds: np.ndarray) -> float:
            """The job's risk of ``preds`` on D_tune's ``rows`` against the dense model (labels where needed)."""
            return float(empirical_risk(per_sample_losses(
                risk, preds, dense_tune_np[rows], None if y_tune_np is None else y_tune_np[rows],
                None if mask_tune is None else mask_tune[rows])))

        def log_probs(x: Any) -> torch.Tensor | None:
            """Log-softmax outputs on ``x`` (fp32), or None when more than the soft-target limit."""
            out: list[torch.Tensor] = []
            size = 0
            for _, _, logits in predictor.logits_batches(x):
                size += logits.numel()
                if size > SOFT_TARGET_ELEMENTS:
                    return None
                out.append(logits.float().log_softmax(dim=-1))
            return torch.cat(out) if out else None

        bn = BatchNormChooser(module, x_tune, cfg.batch_size, seed=cfg.seed, forward=bn_forward,
                              momentum=None if train_forward is None else 1.0,
                              check_risk=check_risk if cfg.bn_statistics == "choose" else None,
                              predict=lambda x: predictor.predict(x).cpu().numpy(), log_probs=log_probs)
    finetuner = None
    if cfg.finetune is not None:
        loss = cfg.finetune.resolved_loss(risk in LABELLED_RISKS, y_tune is not None)
        if loss == "labels" and y_tune is None:
            raise ConfigError("Fine-tuning with loss 'labels' needs labels but the data set has no 'y'. Use "
                              "loss 'distill' (or 'auto'), which trains towards the dense model's outputs.",
                              code="labels_required")
        position_mask = None if mask_tune is None else torch.from_numpy(np.asarray(mask_tune)).to(params[0].device)
        targets = dense_targets(module, x_tune, cfg.batch_size, cfg.output, loss=loss, labels=y_tune,
                                position_mask=position_mask)
        finetuner = Finetuner(module, params, x_tune, targets, cfg.finetune, seed=cfg.seed, output=cfg.output)
    return CandidateBuilder(module, params, originals=originals, reconstructor=reconstructor, bn=bn,
                            finetuner=finetuner)


def _level_details(info: dict[str, Any] | None) -> dict[str, Any]:
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


class _Run:
    """State of one certification: the live module, originals, data on the device."""

    def __init__(self, cfg: CertifyConfig, progress: ProgressFn | None, should_stop: Callable[[], bool] | None):
        self.cfg = cfg
        self._progress = progress
        self.should_stop = should_stop
        self.timings: dict[str, float] = {}

    def report(self, stage: str, done: int, total: int, message: str = "") -> None:
        if stage != "done" and self.should_stop is not None and self.should_stop():
            raise CancelledError()
        if self._progress is not None:
            self._progress(Progress(stage, done, total, message))


def _labels_needed(risk: str, data: CalibrationSet) -> None:
    if risk in LABELLED_RISKS and not data.has_labels:
        raise ConfigError(f"The risk {risk!r} needs labels but the data set has no 'y'. "
                          "Use risk 'disagreement' (needs no labels) or upload labels.", code="labels_required")


def certify(
    model: str | os.PathLike,
    data: str | os.PathLike | CalibrationSet,
    config: dict[str, Any] | CertifyConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    uncertainty: str | os.PathLike | None = None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Certificate:
    """Prune ``model`` at every level of the grid, test each on D_cal, return the certified one.

    Writes the pruned TorchScript artifact to ``out`` (atomically) when given.
    """
    cfg = validate_config(config)
    run = _Run(cfg, progress, should_stop)
    t0 = time.perf_counter()
    run.report("loading", 0, 1, "loading data and model")
    data = data if isinstance(data, CalibrationSet) else load_calibration(data)
    risk = cfg.resolved_risk(data.has_labels)
    _labels_needed(risk, data)
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # CUDA's own start (context, libraries), timed apart from the model's load
        t = time.perf_counter()
        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
        run.timings["cuda_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    module = load_model(model, device)
    run.timings["model_load_s"] = time.perf_counter() - t
    discovery = discover_prunable(module, exclude_first_last=cfg.exclude_first_last, include=cfg.prune_include,
                                  exclude=cfg.prune_exclude)
    weights = discovery.weights
    has_bn = bool(batchnorm_modules(module))
    exported_bn = has_bn and is_exported(module)  # an eval-specialised .pt2 graph: BN statistics stay dense
    use_bn = has_bn and not exported_bn and (cfg.bn_recalibration if cfg.bn_recalibration is not None else True)
    tune_fraction = cfg.resolved_tune_fraction(has_bn and not exported_bn)
    split = split_tune_cal(data.n, tune_fraction, cfg.seed)
    if split.tune.size == 0:
        data_criteria = [c for c in cfg.criterion if c == "obd" or (c == "mu" and uncertainty is None)]
        if data_criteria or (use_bn and cfg.bn_recalibration) or cfg.reconstruct or cfg.procedure == "planned" \
                or cfg.finetune is not None:
            what = (f"criterion {data_criteria[0]!r}" if data_criteria
                    else "weight reconstruction" if cfg.reconstruct
                    else "fine-tuning" if cfg.finetune is not None
                    else "planned procedure" if cfg.procedure == "planned" else "BN re-estimation")
            raise ConfigError(f"The {what} needs tuning data (D_tune) but tune_fraction is 0. "
                              "Set tune_fraction > 0 (e.g. 0.25).", code="tune_data_required")
        use_bn = False
    bound = resolve_bound(cfg.bound, risk)
    procedure = get_procedure(cfg.procedure)
    # Gather each split on the host, then move it: the device never holds a second full copy.
    order = bind_inputs(module, data.input_names)  # the data's input arrays in forward-argument order
    x_cal_host = gather(data.inputs, order, split.cal)
    x_tune_host = gather(data.inputs, order, split.tune)
    run.timings["load_s"] = time.perf_counter() - t0
    expected_batches = expected_batch_forwards(cfg, int(split.cal.size), int(split.tune.size), use_bn, len(weights))
    benchmark = cudnn_benchmark_rule(cfg.cudnn_benchmark, expected_batches, effective_precision(cfg.precision, device))

    with evaluation_precision(cfg.precision, device), \
            Predictor(module, cfg.batch_size, device=device, precision=cfg.precision,
                      cudnn_benchmark=benchmark, output=cfg.output) as predictor:
        # How inputs are evaluated is fixed from D_tune, never from D_cal's values (SPEC §1): the resident
        # dtype (bf16/fp16 halve D_cal's memory; fp32 unchanged) is decided on D_tune, D_tune is rounded the
        # same way (BN statistics and scores see inputs rounded like D_cal's), and the memory layout is timed
        # on a D_tune batch or a synthetic tensor of the batch shape. Converted on the host: the device never
        # holds D_cal's fp32 copy.
        predictor.decide_resident(x_tune_host if x_tune_host.shape[0] else None,
                                  None if isinstance(x_cal_host, ModelInputs) else x_cal_host.dtype)
        t = time.perf_counter()
        x_tune = predictor.rounded(x_tune_host).to(device)
        del x_tune_host
        x_cal = predictor.resident(x_cal_host).to(device)
        del x_cal_host
        run.timings["inputs_to_device_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if device.type == "cuda" and x_cal.dim() == 4 and x_cal.is_floating_point():
            rows = min(cfg.batch_size, x_cal.shape[0])
            if x_tune.shape[0] >= rows:
                predictor.choose_layout(predictor.resident(x_tune[:rows]), "tuning split")
            else:
                synthetic = torch.randn((rows, *x_cal.shape[1:]), device=device).to(x_cal.dtype)
                predictor.choose_layout(synthetic, "synthetic tensor of the batch shape")
            torch.cuda.synchronize(device)
        run.timings["layout_s"] = time.perf_counter() - t
        # Dense predictions once. The model's contract is checked on D_cal and D_tune alike.
        t = time.perf_counter()
        run.report("dense", 0, 1, "dense predictions")
        sequence = risk in SEQUENCE_RISKS  # (N, T, V) logits; the dense top-1 per position is all that is kept
        dense_cal, n_classes = dense_logits_checked(module, x_cal, cfg.batch_size, should_stop, predictor,
                                                    sequence=sequence)
        dense_tune = (dense_logits_checked(module, x_tune, cfg.batch_size, should_stop, predictor,
                                           sequence=sequence)[0]
                      if x_tune.shape[0] else torch.empty(0, dtype=torch.int64, device=device))
        check_labels(data.y, n_classes)
        y_cal = data.y[split.cal] if data.y is not None else None
        y_tune = torch.from_numpy(data.y[split.tune]).to(device) if data.y is not None else dense_tune
        dense_tune_np = dense_tune.cpu().numpy()
        y_tune_np = data.y[split.tune] if data.y is not None else None
        dense_cal_np = dense_cal.cpu().numpy()
        mask_name = sequence_mask_name(data.inputs) if sequence else None  # the positions the sequence risks count
        mask_cal = data.inputs[mask_name][split.cal] if mask_name else None
        mask_tune = data.inputs[mask_name][split.tune] if mask_name else None
        if y_cal is not None and y_cal.ndim != dense_cal_np.ndim:
            per_sample = list(dense_cal_np.shape[1:]) or "one class"
            raise DataError(f"'y' has shape {list(data.y.shape)} but the model predicts {per_sample} "
                            "per sample: labels (N,) for a classifier, (N, T) for a sequence model.",
                            code="data_bad_labels")
        dense_accuracy = prediction_accuracy(dense_cal_np, y_cal, mask_cal) if y_cal is not None else None
        run.timings["dense_s"] = time.perf_counter() - t
        run.timings["dense_setup_s"] = predictor.setup_s  # of dense_s: first-forward warm-ups, graph capture

        params = [w.param for w in weights]
        originals = [p.detach().clone() for p in params]

        # Scores for every criterion (D_tune only), then nested masks from one sort each.
        t = time.perf_counter()
        uncertainty_stats = None
        if uncertainty is not None and "mu" in cfg.criterion:
            from .uncertainty import load_uncertainty

            uncertainty_stats = {k: v.to(device) for k, v in load_uncertainty(uncertainty, weights).items()}
        ctx = ScoreContext(module=module, weights=weights, tune_x=x_tune if x_tune.shape[0] else None,
                           tune_y=y_tune if x_tune.shape[0] else None, batch_size=cfg.batch_size, seed=cfg.seed,
                           uncertainty=uncertainty_stats, mu_steps=cfg.mu_steps, mu_lr=cfg.mu_lr,
                           obd_samples=cfg.obd_samples, output=cfg.output)
        masks_by_criterion: dict[str, NestedMasks | PatternMasks] = {}
        for i, name in enumerate(cfg.criterion):
            run.report("scoring", i, len(cfg.criterion), f"scoring weights by {name}")
            scores = get_criterion(name)(ctx)
            restore(params, originals)  # a criterion must leave the weights as it found them
            masks_by_criterion[name] = (NestedMasks.from_scores(scores, cfg.scope) if cfg.pattern is None else
                                        PatternMasks.from_scores(scores, cfg.scope, [
                                            "ConvTranspose" if w.kind == "conv_transpose" else w.module_type
                                            for w in weights]))
            del scores
        run.timings["scoring_s"] = time.perf_counter() - t
        # Weight reconstruction: per-layer input statistics of the dense model on D_tune only.
        reconstructor = None
        if cfg.reconstruct:
            t = time.perf_counter()
            run.report("scoring", len(cfg.criterion), len(cfg.criterion), "layer inputs for reconstruction")
            reconstructor = Reconstructor.from_tune(module, weights, x_tune, cfg.batch_size)
            run.timings["reconstruct_setup_s"] = time.perf_counter() - t

        # Test every criterion's grid with its share of δ (Bonferroni across criteria).
        t = time.perf_counter()
        delta_each = split_delta(cfg.delta, len(cfg.criterion))
        # The grid of each criterion: the configured sparsities, or its 2:4 layer levels (fixed before D_cal).
        grids = {name: cfg.sparsities if cfg.pattern is None else masks_by_criterion[name].sparsities
                 for name in cfg.criterion}
        total = sum(len(g) for g in grids.values())
        per_criterion: list[dict[str, Any]] = []
        bn_status = ("no_batchnorm" if not has_bn else "unavailable_exported_graph" if exported_bn
                     else "on" if use_bn else "off")
        evaluated_levels = 0
        # What each evaluated level looked like when it was tested: its accuracy on D_cal (no extra pass
        # is needed for the artifact's accuracy), and the candidate that is the best certified so far.
        tested_accuracy: dict[tuple[str, int], float] = {}
        failed_losses: dict[tuple[str, int], np.ndarray] = {}  # levels a test did not reject: for `more_data`
        t_setup = time.perf_counter()
        builder = _candidate_builder(cfg, module, params, originals, reconstructor, predictor, x_tune, use_bn=use_bn,
                                     risk=risk, dense_tune_np=dense_tune_np,
                                     y_tune=y_tune if data.y is not None else None, y_tune_np=y_tune_np,
                                     mask_tune=mask_tune)
        del originals  # the builder holds them now
        run.timings["candidates_setup_s"] = time.perf_counter() - t_setup  # fine-tuning targets
        best_state: tuple[float, CandidateState] | None = None  # (sparsity, candidate) of the best rejection
        level_info: dict[tuple[str, int], dict[str, Any]] = {}

        def build_candidate(masks: Any, name: str, j: int, sparsity: float) -> None:
            """Make the module level j's candidate in place (calibration.candidates: D_tune only)."""
            nonlocal use_bn, bn_status
            level_info[(name, j)] = builder.build(masks.keep_masks(sparsity), j)
            if builder.bn is not None and not builder.bn.available and use_bn:
                use_bn, bn_status = False, "unavailable_traced_graph"

        tune_levels_evaluated = 0
        for ci, name in enumerate(cfg.criterion):
            masks = masks_by_criterion[name]
            grid = grids[name]
            n_levels = len(grid)
            levels: list[dict[str, Any]] = []
            p_values = np.full(n_levels, np.nan)
            stopped = False
            # The per-test level this procedure rejects at (δ_each for fixed-sequence, δ_each/K for
            # Bonferroni): fixed before D_cal is seen, it calibrates paired_exact and tunes wsr's bets.
            alpha = procedure.level_alpha(delta_each, n_levels)
            crit_procedure, plan = procedure, None
            if cfg.procedure == "planned":
                # D_tune alone chooses which levels D_cal tests (calibration.planned_sequence: valid because
                # D_tune ⫫ D_cal; the candidates and the sequence are fixed before D_cal is looked at).
                def tune_losses(j: int) -> np.ndarray:
                    sparsity = grid[j]
                    if sparsity > 0.0:
                        build_candidate(masks, name, j, sparsity)
                    else:  # the dense model itself, whichever level the bisection tried before
                        builder.reset()
                    pruned_tune = predictor.predict(x_tune, should_stop).cpu().numpy()
                    losses = per_sample_losses(risk, pruned_tune, dense_tune_np, y_tune_np, mask_tune)
                    tune_risks[j] = float(empirical_risk(losses))  # shown in the report's plot, not tested
                    return losses

                tune_risks: dict[int, float] = {}
                plan = plan_sequence(n_levels, lambda j: predict_pass(bound, risk, tune_losses(j),
                                                                       int(split.cal.size), cfg.epsilon, alpha))
                tune_levels_evaluated += len(plan.tune_evaluated)
                builder.reset()
                crit_procedure = PlannedSequence(plan.sequence)
            planned = None if plan is None else set(plan.sequence)
            for j, sparsity in enumerate(grid):
                run.report("testing", ci * n_levels + j, total, f"{name}: sparsity {sparsity:.2%}")
                if (stopped and not cfg.full_curve) or (planned is not None and j not in planned):
                    levels.append({"sparsity": sparsity, "empirical_risk": None, "p_value": None,
                                   "rejected": False, "evaluated": False, "upper_bound": None})
                    continue
                if sparsity == 0.0 and risk != "error_rate":
                    # λ = 0 is the dense model itself: its accuracy drop / disagreement is 0 by definition,
                    # no test is spent on it. (Under error_rate its risk is its own error: tested below.)
                    p, risk_hat, ucb = 0.0, 0.0, 0.0
                else:
                    if sparsity == 0.0:  # error_rate: the dense model is tested like any level
                        pruned = dense_cal_np
                    else:
                        build_candidate(masks, name, j, sparsity)
                        pruned = predictor.predict(x_cal, should_stop).cpu().numpy()
                        if y_cal is not None:
                            tested_accuracy[(name, j)] = prediction_accuracy(pruned, y_cal, mask_cal)
                    losses = per_sample_losses(risk, pruned, dense_cal_np, y_cal, mask_cal)
                    p = float(p_value(bound, risk, losses, cfg.epsilon, alpha=alpha))
                    risk_hat = float(empirical_risk(losses))
                    ucb = float(upper_confidence_bound(bound, risk, losses, alpha, epsilon=cfg.epsilon))
                    evaluated_levels += 1
                    if p > alpha:
                        failed_losses[(name, j)] = losses
                p_values[j] = p
                if procedure.stops_early and p > delta_each:
                    stopped = True
                levels.append({"sparsity": sparsity, "empirical_risk": risk_hat, "p_value": p,
                               "rejected": False, "evaluated": True, "upper_bound": ucb,
                               **_level_details(level_info.get((name, j)))})
                # Levels are tested in ascending order and a level's rejection depends on the p-values up
                # to it only: the final λ̂ is the last level rejected when it was tested. Keep that
                # candidate (ties across criteria: the first listed, as below).
                if sparsity > 0.0 and crit_procedure.rejected(p_values, delta_each)[j] and \
                        (best_state is None or sparsity > best_state[0]):
                    best_state = (sparsity, builder.snapshot())
            rejected = crit_procedure.rejected(p_values, delta_each)
            for lvl, rej in zip(levels, rejected):
                lvl["rejected"] = bool(rej)
            chosen = crit_procedure.select(rejected, np.asarray(grid))
            certified_sparsity = float(grid[chosen]) if chosen is not None else 0.0
            per_criterion.append({"criterion": name, "delta": delta_each, "certified_sparsity": certified_sparsity,
                                  "certified": certified_sparsity > 0.0, "levels": levels})
            if plan is not None:
                per_criterion[-1]["plan"] = {**plan.to_dict(), "sparsities": [grid[i] for i in plan.sequence],
                                             "tune_sparsities": [grid[i] for i in plan.tune_evaluated],
                                             "tune_risks": [tune_risks[i] for i in plan.tune_evaluated]}
            builder.reset()
        run.timings["testing_s"] = time.perf_counter() - t
        run.timings["testing_setup_s"] = predictor.setup_s - run.timings["dense_setup_s"]  # new shapes' warm-ups

        # The winner: the largest certified sparsity (ties → the first criterion listed).
        best = max(per_criterion, key=lambda c: c["certified_sparsity"])
        certified_sparsity = best["certified_sparsity"]
        certified = certified_sparsity > 0.0
        masks = masks_by_criterion[best["criterion"]]
        zeroed_per_layer = masks.zeroed_per_layer(certified_sparsity)
        pruned_accuracy = dense_accuracy
        more_data = _more_data(best, grids[best["criterion"]], failed_losses, bound=bound, risk=risk,
                               epsilon=cfg.epsilon, alpha=procedure.level_alpha(delta_each, len(grids[best["criterion"]])))
        del failed_losses
        if certified:
            chosen_level = (best["criterion"], grids[best["criterion"]].index(certified_sparsity))
            assert best_state is not None and best_state[0] == certified_sparsity
            builder.load(best_state[1])  # exactly the tested candidate: weights and BN statistics
            pruned_accuracy = tested_accuracy.get(chosen_level, pruned_accuracy)
        del best_state

    precision = effective_precision(cfg.precision, device)  # reduced precisions exist on CUDA only
    # How the candidates were built, for the result and the guarantee sentence
    finetune_info = ({**builder.finetuner.describe(), "chain": builder.chaining}
                     if builder.finetuner is not None else None)
    bn_info = builder.bn.summary() if builder.bn is not None and use_bn else None
    layers = [{"name": w.name, "type": w.module_type, "parameters": w.numel, "zeroed": z,
               "sparsity": z / w.numel} for w, z in zip(weights, zeroed_per_layer)]
    prunable = sum(w.numel for w in weights)
    result: dict[str, Any] = {
        "certified_sparsity": certified_sparsity,
        "certified": certified,
        "epsilon": cfg.epsilon,
        "delta": cfg.delta,
        "risk": risk,
        "bound": bound,
        "bound_requested": cfg.bound,
        "procedure": cfg.procedure,
        "criterion": best["criterion"],
        "scope": cfg.scope,
        "n_calibration": int(split.cal.size),
        "n_tune": int(split.tune.size),
        "seed": cfg.seed,
        "dense_accuracy": dense_accuracy,
        "pruned_accuracy": pruned_accuracy,
        "prunable_parameters": prunable,
        "prunable_weights": discovery.summary(),  # candidates vs all weight matrices (calibration.discovery)
        "zeroed_parameters": int(sum(zeroed_per_layer)),
        "total_parameters": int(sum(p.numel() for p in module.parameters())),
        "levels": best["levels"],
        "criteria": per_criterion,
        "layers": layers,
        "bn_recalibration": bn_status,
        "device": device.type,
        "precision": precision,
        "precision_requested": cfg.precision,
        "evaluator": {**predictor.describe(), "expected_batches": expected_batches},
        "levels_evaluated": evaluated_levels,
        "levels_evaluated_tune": tune_levels_evaluated,  # planned procedure: levels D_tune evaluated to plan
        "reconstruction": reconstructor.summary(weights) if reconstructor is not None else None,
        "bn_statistics": bn_info,
        "finetune": finetune_info,
        "more_data": more_data,
        "bound_note": _bound_note(bound, risk, cfg.epsilon),
        "pattern": cfg.pattern,
        "pattern_layers": ([weights[i].name for i in masks.made_two_four(certified_sparsity)]
                           if isinstance(masks, PatternMasks) else None),
        "guarantee": guarantee_sentence(certified=certified, sparsity=certified_sparsity, risk=risk, bound=bound,
                                        epsilon=cfg.epsilon, delta=cfg.delta, n_cal=int(split.cal.size),
                                        advice=None if certified else failure_advice(best["levels"], cfg.epsilon),
                                        criterion=_method_label(
                                            best["criterion"], cfg,
                                            reconstructed=((len(reconstructor.hessians), len(weights))
                                                           if reconstructor is not None else False),
                                            candidates=discovery.summary(),
                                            finetune=finetune_info, bn=bn_info,
                                            precision=precision, channels_last=bool(predictor.channels_last),
                                            on_cuda=device.type == "cuda")),
        "artifact_sha256": None,
    }
    if out is not None:
        run.report("saving", 0, 1, "saving the pruned model")
        t = time.perf_counter()
        if device.type != "cpu":
            module.to("cpu")
        save_model(module, out)
        result["artifact_sha256"] = _sha256(Path(out))
        result["artifact_bytes"] = Path(out).stat().st_size
        run.timings["save_s"] = time.perf_counter() - t
    run.timings["total_s"] = time.perf_counter() - t0
    result["timings"] = {k: round(v, 4) for k, v in run.timings.items()}
    run.report("done", 1, 1, "finished")
    return Certificate(result=result, timings=run.timings)


__all__ = ["Certificate", "Progress", "certify", "expected_batch_forwards", "guarantee_sentence", "predict"]
