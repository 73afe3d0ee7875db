"""The evaluation engine: ``certify`` as a short pipeline of phases over typed results.

load → split → dense pass → candidates (scores, masks, builder) → test the grid and select (``grid``) →
result → artifact. Data flows one way (MAPIE's split): predictions → per-sample losses (``risks``) →
p-values (``p_values``) → family-wise procedure (``procedures``) → certified level; one level's
evaluation is ``levels.evaluate_level``, the typed results are ``certificate``. The split into D_tune /
D_cal happens once, first; scores, BN re-estimation, fine-tuning, pseudo-labels and the planned
procedure's plan see D_tune only, p-values see D_cal only, so the Learn-then-Test guarantee of SPEC §1
holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from . import batchnorm
from .candidates import BatchNormChooser, CandidateBuilder
from .certificate import (Certificate, CriterionResult, LevelResult, bound_note, failure_advice, guarantee_sentence,
                          method_label)
from .config import LABELLED_RISKS, CertifyConfig, validate_config
from .criteria import ScoreContext, get_criterion
from .data import CalibrationSet, Split, check_labels, load_calibration, split_tune_cal
from .discovery import Discovery
from .errors import CancelledError, ConfigError, DataError, ModelError, exception_summary
from .fast_eval import Predictor, cudnn_benchmark_rule, effective_precision, graph_optimization_rule
from .finetune import SOFT_TARGET_ELEMENTS, Finetuner, dense_targets
from .grid import GridOutcome, Selection, grid_phase, select_phase
from .inputs import ModelInputs, bind_inputs, call, describe_batch, gather, select_output
from .levels import Candidates, LevelData, LevelTest, evaluate_level
from .masks import NestedMasks, restore
from .model import batchnorm_modules, discover_prunable, is_exported, load_model, resolve_device, save_model
from .p_values import resolve_bound
from .patterns import PatternMasks
from .procedures import Procedure, get_procedure
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



ProgressFn = Callable[[Progress], None]


@contextlib.contextmanager
def tf32_flags(enabled: bool) -> Iterator[None]:
    """TF32 convolutions and matmuls on CUDA on or off for a while (then the flags as they were)."""
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32


@contextlib.contextmanager
def evaluation_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Evaluate in the precision the artifact will run at; fp32 (exact) unless asked otherwise."""
    with tf32_flags(precision == "tf32"):
        if precision in ("bf16", "fp16") and device.type == "cuda":
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            # No weight-cast cache: weights change in place between levels.
            with torch.autocast("cuda", dtype=dtype, cache_enabled=False):
                yield
        else:
            yield


def tf32_math() -> contextlib.AbstractContextManager[None]:
    """TF32 on for a while: the BN chooser's math in an fp32 job on CUDA."""
    return tf32_flags(True)


def finetune_math(device: torch.device) -> tuple[str, Callable[[], Any]] | None:
    """The math of fine-tuning (``finetune.Finetuner``, fp32 with autocast off in every job): TF32 on CUDA — it
    builds the candidate from D_tune and is not the test — else fp32."""
    return ("tf32", tf32_math) if device.type == "cuda" else None


def chooser_math(precision: str, device: torch.device) -> tuple[str, Callable[[], Any]] | None:
    """The math of the BN chooser's passes (``candidates.BatchNormChooser``): TF32 in an fp32 job on CUDA — they
    build the candidate from D_tune and are not the test, which stays in fp32 — else the job's own precision."""
    return ("tf32", tf32_math) if precision == "fp32" and device.type == "cuda" else None


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
                              predict=lambda x: predictor.predict(x).cpu().numpy(), log_probs=log_probs,
                              math=chooser_math(cfg.precision, predictor.device))
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
        finetuner = Finetuner(module, params, x_tune, targets, cfg.finetune, seed=cfg.seed, output=cfg.output,
                              math=finetune_math(predictor.device))
    return CandidateBuilder(module, params, originals=originals, reconstructor=reconstructor, bn=bn,
                            finetuner=finetuner)



class Run:
    """One certification's state across the phases: its config, risk, progress callback and timings."""

    def __init__(self, cfg: CertifyConfig, progress: ProgressFn | None, should_stop: Callable[[], bool] | None):
        self.cfg = cfg
        self._progress = progress
        self.should_stop = should_stop
        self.timings: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.risk = ""  # the job's risk, once the data is loaded

    def report(self, stage: str, done: int, total: int, message: str = "") -> None:
        if stage != "done" and self.should_stop is not None and self.should_stop():
            raise CancelledError()
        if self._progress is not None:
            self._progress(Progress(stage, done, total, message))


_Run = Run  # the name it had


def _labels_needed(risk: str, data: CalibrationSet) -> None:
    if risk in LABELLED_RISKS and not data.has_labels:
        raise ConfigError(f"The risk {risk!r} needs labels but the data set has no 'y'. "
                          "Use risk 'disagreement' (needs no labels) or upload labels.", code="labels_required")


# ----------------------------------------------------------------------------- the phases' typed results


@dataclass
class Loaded:
    """Phase 1: the data, the job's risk, the device, the live module and its prunable weights."""

    data: CalibrationSet
    risk: str
    device: torch.device
    module: torch.nn.Module
    discovery: Discovery
    has_bn: bool
    exported_bn: bool  # an eval-specialised .pt2 graph: BN statistics stay dense
    use_bn: bool  # BN statistics re-estimated per candidate (before the split: may still be turned off)

    @property
    def weights(self) -> list[Any]:
        return self.discovery.weights


@dataclass
class Splits:
    """Phase 2: D_tune / D_cal (indices and host inputs in forward-argument order) and what is fixed with them."""

    split: Split
    x_cal_host: Any
    x_tune_host: Any
    use_bn: bool
    bound: str
    procedure: Procedure
    expected_batches: int
    cudnn_benchmark: bool

    @property
    def n_cal(self) -> int:
        return int(self.split.cal.size)

    @property
    def n_tune(self) -> int:
        return int(self.split.tune.size)


@dataclass
class DensePass:
    """Phase 3: both splits on the device with the dense model's predictions (the model's contract checked)."""

    cal: LevelData
    tune: LevelData
    y_tune: torch.Tensor  # labels on the device, or the dense predictions where there are none (scores, fine-tuning)
    dense_accuracy: float | None


@dataclass
class CandidateSetup:
    """Phase 4: nested masks per criterion (from D_tune scores), each criterion's grid, the candidate builder."""

    masks: dict[str, NestedMasks | PatternMasks]
    grids: dict[str, list[float]]
    reconstructor: Reconstructor | None
    builder: CandidateBuilder

    def of(self, name: str, predictor: Predictor) -> Candidates:
        return Candidates(self.masks[name], self.builder, predictor)


# ----------------------------------------------------------------------------- the phases


def load_phase(run: Run, model: str | os.PathLike, data: str | os.PathLike | CalibrationSet) -> Loaded:
    """Load the data and the model onto the device; find the prunable weights and the BatchNorm layers."""
    cfg = run.cfg
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
    has_bn = bool(batchnorm_modules(module))
    exported_bn = has_bn and is_exported(module)
    use_bn = has_bn and not exported_bn and (cfg.bn_recalibration if cfg.bn_recalibration is not None else True)
    run.risk = risk
    return Loaded(data, risk, device, module, discovery, has_bn, exported_bn, use_bn)


def split_phase(run: Run, job: Loaded, uncertainty: str | os.PathLike | None) -> Splits:
    """Split D_tune / D_cal once (seeded), check what needs D_tune has it, gather each split on the host."""
    cfg = run.cfg
    data, use_bn = job.data, job.use_bn
    tune_fraction = cfg.resolved_tune_fraction(job.has_bn and not job.exported_bn)
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
    bound = resolve_bound(cfg.bound, job.risk)
    procedure = get_procedure(cfg.procedure)
    # Gather each split on the host, then move it: the device never holds a second full copy.
    order = bind_inputs(job.module, data.input_names)  # the data's input arrays in forward-argument order
    x_cal_host = gather(data.inputs, order, split.cal)
    x_tune_host = gather(data.inputs, order, split.tune)
    run.timings["load_s"] = time.perf_counter() - run.t0
    expected = expected_batch_forwards(cfg, int(split.cal.size), int(split.tune.size), use_bn, len(job.weights))
    benchmark = cudnn_benchmark_rule(cfg.cudnn_benchmark, expected, effective_precision(cfg.precision, job.device))
    return Splits(split, x_cal_host, x_tune_host, use_bn, bound, procedure, expected, benchmark)


@contextlib.contextmanager
def evaluator(run: Run, job: Loaded, splits: Splits) -> Iterator[Predictor]:
    """The predictor every pass runs through (dense, scores' forwards, levels), in the precision the artifact
    will run at; the phases from the dense pass to the selection run inside it."""
    cfg = run.cfg
    with evaluation_precision(cfg.precision, job.device), \
            Predictor(job.module, cfg.batch_size, device=job.device, precision=cfg.precision,
                      cudnn_benchmark=splits.cudnn_benchmark, output=cfg.output,
                      expected_batches=splits.expected_batches,  # layout_trial_rule
                      graph_optimization=graph_optimization_rule(splits.expected_batches)) as predictor:
        yield predictor


def dense_phase(run: Run, job: Loaded, splits: Splits, predictor: Predictor) -> DensePass:
    """Both splits onto the device as they will be evaluated; the dense predictions once, contract checked."""
    cfg, device, data, split = run.cfg, job.device, job.data, splits.split
    # How inputs are evaluated is fixed from D_tune, never from D_cal's values (SPEC §1): the resident
    # dtype (bf16/fp16 halve D_cal's memory; fp32 unchanged) is decided on D_tune, D_tune is rounded the
    # same way (BN statistics and scores see inputs rounded like D_cal's), and the memory layout is timed
    # on a D_tune batch or a synthetic tensor of the batch shape. Converted on the host: the device never
    # holds D_cal's fp32 copy.
    x_cal_host, x_tune_host = splits.x_cal_host, splits.x_tune_host
    splits.x_cal_host = splits.x_tune_host = None  # the device copies replace them
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
    sequence = job.risk in SEQUENCE_RISKS  # (N, T, V) logits; the dense top-1 per position is all that is kept
    dense_cal, n_classes = dense_logits_checked(job.module, x_cal, cfg.batch_size, run.should_stop, predictor,
                                                sequence=sequence)
    dense_tune = (dense_logits_checked(job.module, x_tune, cfg.batch_size, run.should_stop, predictor,
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
    return DensePass(cal=LevelData(x_cal, dense_cal_np, y_cal, mask_cal),
                     tune=LevelData(x_tune, dense_tune_np, y_tune_np, mask_tune),
                     y_tune=y_tune, dense_accuracy=dense_accuracy)


def candidates_phase(run: Run, job: Loaded, splits: Splits, dense: DensePass, predictor: Predictor,
                     uncertainty: str | os.PathLike | None) -> CandidateSetup:
    """Scores for every criterion (D_tune only) → nested masks from one sort each → the candidate builder
    (reconstruction statistics, BN chooser, fine-tuning targets: D_tune only)."""
    cfg, device, module, weights = run.cfg, job.device, job.module, job.weights
    x_tune = dense.tune.x
    params = [w.param for w in weights]
    originals = [p.detach().clone() for p in params]
    t = time.perf_counter()
    uncertainty_stats = None
    if uncertainty is not None and "mu" in cfg.criterion:
        from .uncertainty import load_uncertainty

        uncertainty_stats = {k: v.to(device) for k, v in load_uncertainty(uncertainty, weights).items()}
    ctx = ScoreContext(module=module, weights=weights, tune_x=x_tune if x_tune.shape[0] else None,
                       tune_y=dense.y_tune if x_tune.shape[0] else None, batch_size=cfg.batch_size, seed=cfg.seed,
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
    # The grid of each criterion: the configured sparsities, or its 2:4 layer levels (fixed before D_cal).
    grids = {name: cfg.sparsities if cfg.pattern is None else masks_by_criterion[name].sparsities
             for name in cfg.criterion}
    t = time.perf_counter()
    builder = _candidate_builder(cfg, module, params, originals, reconstructor, predictor, x_tune,
                                 use_bn=splits.use_bn, risk=job.risk, dense_tune_np=dense.tune.dense,
                                 y_tune=dense.y_tune if job.data.y is not None else None,
                                 y_tune_np=dense.tune.labels, mask_tune=dense.tune.mask)
    run.timings["candidates_setup_s"] = time.perf_counter() - t  # fine-tuning targets
    return CandidateSetup(masks_by_criterion, grids, reconstructor, builder)


def result_phase(run: Run, job: Loaded, splits: Splits, dense: DensePass, setup: CandidateSetup,
                 grid: GridOutcome, chosen: Selection, predictor: Predictor) -> Certificate:
    """The typed certificate: what was certified, how the candidates were made, the guarantee in words."""
    cfg, device, weights, builder = run.cfg, job.device, job.weights, setup.builder
    winner = grid.criteria[chosen.best]
    masks = setup.masks[winner.criterion]
    certified, sparsity = winner.certified, chosen.certified_sparsity
    zeroed_per_layer = masks.zeroed_per_layer(sparsity)
    precision = effective_precision(cfg.precision, device)  # reduced precisions exist on CUDA only
    finetune_info = ({**builder.finetuner.describe(), "chain": builder.chaining}
                     if builder.finetuner is not None else None)
    bn_info = builder.bn.summary() if builder.bn is not None and builder.bn.available else None
    reconstructor = setup.reconstructor
    label = method_label(winner.criterion, cfg,
                         reconstructed=((len(reconstructor.hessians), len(weights)) if reconstructor is not None
                                        else False),
                         candidates=job.discovery.summary(), finetune=finetune_info, bn=bn_info,
                         precision=precision, channels_last=bool(predictor.channels_last),
                         on_cuda=device.type == "cuda")
    advice = None if certified else failure_advice([lvl.to_dict() for lvl in winner.levels], cfg.epsilon)
    return Certificate(
        criteria=grid.criteria, best=chosen.best, epsilon=cfg.epsilon, delta=cfg.delta, risk=run.risk,
        bound=splits.bound, bound_requested=cfg.bound, procedure=cfg.procedure, scope=cfg.scope,
        n_calibration=splits.n_cal, n_tune=splits.n_tune, seed=cfg.seed,
        dense_accuracy=dense.dense_accuracy, pruned_accuracy=chosen.pruned_accuracy,
        prunable_parameters=sum(w.numel for w in weights), prunable_weights=job.discovery.summary(),
        zeroed_parameters=int(sum(zeroed_per_layer)),
        total_parameters=int(sum(p.numel() for p in job.module.parameters())),
        layers=[{"name": w.name, "type": w.module_type, "parameters": w.numel, "zeroed": z, "sparsity": z / w.numel}
                for w, z in zip(weights, zeroed_per_layer)],
        bn_recalibration=grid.bn_status, device=device.type, precision=precision,
        precision_requested=cfg.precision,
        evaluator={**predictor.describe(), "expected_batches": splits.expected_batches},
        levels_evaluated=grid.levels_evaluated, levels_evaluated_tune=grid.levels_evaluated_tune,
        reconstruction=reconstructor.summary(weights) if reconstructor is not None else None,
        bn_statistics=bn_info, finetune=finetune_info, more_data=chosen.more_data,
        bound_note=bound_note(splits.bound, run.risk, cfg.epsilon), pattern=cfg.pattern,
        pattern_layers=([weights[i].name for i in masks.made_two_four(sparsity)]
                        if isinstance(masks, PatternMasks) else None),
        guarantee=guarantee_sentence(certified=certified, sparsity=sparsity, risk=run.risk, bound=splits.bound,
                                     epsilon=cfg.epsilon, delta=cfg.delta, n_cal=splits.n_cal, advice=advice,
                                     criterion=label),
        timings=run.timings)


def artifact_phase(run: Run, job: Loaded, cert: Certificate, out: str | os.PathLike) -> None:
    """Write the live module (the certified candidate, or the dense model) to ``out`` atomically; its checksum."""
    run.report("saving", 0, 1, "saving the pruned model")
    t = time.perf_counter()
    if job.device.type != "cpu":
        job.module.to("cpu")
    save_model(job.module, out)
    cert.artifact_sha256 = _sha256(Path(out))
    cert.artifact_bytes = Path(out).stat().st_size
    run.timings["save_s"] = time.perf_counter() - t


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
    run = Run(validate_config(config), progress, should_stop)
    job = load_phase(run, model, data)
    splits = split_phase(run, job, uncertainty)
    with evaluator(run, job, splits) as predictor:
        dense = dense_phase(run, job, splits, predictor)
        setup = candidates_phase(run, job, splits, dense, predictor, uncertainty)
        grid = grid_phase(run, job, splits, dense, setup, predictor)
        chosen = select_phase(run, splits, dense, setup, grid)
    cert = result_phase(run, job, splits, dense, setup, grid, chosen, predictor)
    if out is not None:
        artifact_phase(run, job, cert, out)
    run.timings["total_s"] = time.perf_counter() - run.t0
    run.report("done", 1, 1, "finished")
    return cert


__all__ = ["Candidates", "Certificate", "CriterionResult", "LevelData", "LevelResult", "LevelTest", "Progress",
           "certify", "evaluate_level", "expected_batch_forwards", "failure_advice", "guarantee_sentence", "predict"]
