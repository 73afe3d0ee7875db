"""CertifyConfig: the parameters of one certification, validated once at the boundary.

Validation follows scikit-learn's habit: ``PARAMETERS`` declares each field's constraint
(``calibration.params``), default, help and CLI flag; ``validate_config`` loops over it, with errors that
name the parameter, what was expected and what arrived. Internal code then trusts the values. The same
table generates the options of ``certiprune certify`` and ``certiprune submit``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .params import (Boolean, Choices, Grid, IndexOrKey, IntRange, Interval, NamePatterns, Nullable, Options, Param,
                     Switchable, describe_table, fail, values_from_options)

CRITERIA = ("magnitude", "mu", "obd", "random")
DATA_CRITERIA = ("mu", "obd")  # criteria whose scores need D_tune
SCOPES = ("global", "layerwise")
RISKS = ("accuracy_drop", "disagreement", "error_rate", "token_disagreement", "token_accuracy_drop")
LABELLED_RISKS = ("accuracy_drop", "error_rate", "token_accuracy_drop")
BOUNDS = ("auto", "binomial", "hb", "wsr", "paired_exact")
PROCEDURES = ("fixed_sequence", "bonferroni", "planned")
#: D_tune share when only the planned procedure needs it (magnitude without BN): planning needs few samples
PLANNING_TUNE_FRACTION = 0.1
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
PATTERNS = ("2:4",)  # semi-structured patterns (calibration.patterns)
BN_STATISTICS = ("choose", "reestimate")  # calibration.candidates.BatchNormChooser


FINETUNE_LOSSES = ("auto", "labels", "distill")  # calibration.finetune


@dataclass(frozen=True)
class FinetuneConfig:
    """How every level's candidate is fine-tuned on D_tune (``finetune`` in the job's config)."""

    steps: int = 50  # per level; with ``chain`` a level continues from the one below it
    lr: float = 0.02  # relative: each layer's Adam learning rate is lr × the RMS of its dense weights
    batch_size: int = 64
    chain: bool = True  # start each level from the previous level's fine-tuned weights (not with reconstruct)
    loss: str = "auto"  # auto = distill (to the dense model's outputs); labels: cross-entropy on D_tune's labels

    def resolved_loss(self, labelled_risk: bool, has_labels: bool) -> str:
        """``auto`` is distillation for every risk: on digits (4 seeds, ε 0.01 / 0.02, 299 tuning samples)
        it certified 0.855 / 0.955 (MLP) and 0.80 / 0.885 (CNN) against 0.70 / 0.94 and 0.00 / 0.86 for
        cross-entropy on labels, which drifts from the dense model even where little is pruned."""
        return "distill" if self.loss == "auto" else self.loss


def default_sparsities() -> tuple[float, ...]:
    """0.00, 0.01, …, 0.99 (λ = 0 is the dense model)."""
    return tuple(round(i / 100, 2) for i in range(100))


@dataclass(frozen=True)
class CertifyConfig:
    """Everything that fixes a certification before D_cal is looked at."""

    criterion: tuple[str, ...] = ("magnitude",)
    scope: str = "global"
    risk: str | None = None  # None: accuracy_drop with labels, disagreement without
    epsilon: float = 0.01
    delta: float = 0.1
    sparsities: tuple[float, ...] = field(default_factory=default_sparsities)
    bound: str = "auto"
    procedure: str = "fixed_sequence"
    tune_fraction: float | None = None  # None: 0.25 when something needs D_tune, else 0
    seed: int = 0
    batch_size: int = 512
    device: str = "auto"
    precision: str = "fp32"
    exclude_first_last: bool = False
    prune_include: tuple[str, ...] | None = None  # glob patterns over parameter names: only these (calibration.discovery)
    prune_exclude: tuple[str, ...] = ()  # glob patterns over parameter names: never these
    bn_recalibration: bool | None = None  # None: on when the model has BatchNorm
    bn_statistics: str = "choose"  # choose: dense/re-estimated/blended per level on D_tune; reestimate: always
    full_curve: bool = False  # evaluate every level, also after testing stopped
    mu_steps: int = 64  # re-created trajectory length for mu without uploaded statistics
    mu_lr: float = 1e-3
    obd_samples: int = 256  # per-sample gradients averaged for the Fisher diagonal
    reconstruct: bool = False  # re-fit kept weights on D_tune after masking (calibration.reconstruct)
    finetune: FinetuneConfig | None = None  # train kept weights on D_tune, mask fixed (calibration.finetune)
    pattern: str | None = None  # None: unstructured; "2:4": the grid is which layers are made 2:4
    cudnn_benchmark: bool | None = None  # None: cuDNN's autotuner only for jobs large enough (fast_eval)
    output: int | str | None = None  # the logits in a tuple/list (index) or dict (key) output; None: first tensor / 'logits'

    def resolved_risk(self, has_labels: bool) -> str:
        return self.risk or ("accuracy_drop" if has_labels else "disagreement")

    def needs_tune_data(self, has_batchnorm: bool) -> bool:
        bn = self.bn_recalibration if self.bn_recalibration is not None else has_batchnorm
        return (any(c in DATA_CRITERIA for c in self.criterion) or bool(bn and has_batchnorm) or self.reconstruct
                or self.finetune is not None)

    def resolved_tune_fraction(self, has_batchnorm: bool) -> float:
        if self.tune_fraction is not None:
            return self.tune_fraction
        if self.needs_tune_data(has_batchnorm):
            return 0.25
        return PLANNING_TUNE_FRACTION if self.procedure == "planned" else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["criterion"] = list(self.criterion)
        d["sparsities"] = list(self.sparsities)
        d["prune_include"] = None if self.prune_include is None else list(self.prune_include)
        d["prune_exclude"] = list(self.prune_exclude)
        d["finetune"] = None if self.finetune is None else asdict(self.finetune)
        return d


#: finetune's own fields, in the order they are checked
FINETUNE_PARAMETERS: dict[str, Param] = {
    "steps": Param(IntRange(0, 1_000_000), FinetuneConfig.steps,
                   "fine-tuning steps per level; with chain a level continues from the one below it"),
    "batch_size": Param(IntRange(1, 1 << 16), FinetuneConfig.batch_size, "fine-tuning batch size"),
    "lr": Param(Interval(0, 1, closed="right", note="relative: a layer's step is lr × the RMS of its weights"),
                FinetuneConfig.lr, "relative fine-tuning rate: each layer's Adam step is LR × the RMS of its weights",
                flag="--finetune-lr", metavar="LR"),
    "loss": Param(Options(FINETUNE_LOSSES), FinetuneConfig.loss,
                  "distill (to the dense model's logits; what auto means) or labels (cross-entropy on D_tune's labels)",
                  flag="--finetune-loss"),
    "chain": Param(Boolean(), FinetuneConfig.chain,
                   "start each level from the previous level's fine-tuned weights (not with reconstruct)"),
}

_D = CertifyConfig()
_OPEN_UNIT = Interval(0, 1, closed="neither", expected="a number in the open interval (0, 1)")
_TRUE_FALSE_NULL = Nullable(Boolean(), expected="true, false or null")

#: One entry per CertifyConfig field: constraint, default, help, and the CLI flag (None: only via --config).
PARAMETERS: dict[str, Param] = {
    "criterion": Param(Choices(CRITERIA), _D.criterion,
                       "which weights go first; several are tested with δ split between them", flag="--criterion"),
    "scope": Param(Options(SCOPES), _D.scope, "rank weights across the whole model (global) or within each layer",
                   flag="--scope"),
    "risk": Param(Nullable(Options(RISKS)), _D.risk, "what must stay under ε", flag="--risk",
                  default_help="accuracy_drop with labels, disagreement without"),
    "epsilon": Param(_OPEN_UNIT, _D.epsilon, "tolerance ε in (0, 1) for the risk", flag="--epsilon"),
    "delta": Param(_OPEN_UNIT, _D.delta, "allowed failure probability δ in (0, 1)", flag="--delta",
                   default_help="0.1: 90% sure"),
    "sparsities": Param(Grid(max_levels=1000), _D.sparsities, "the levels: a comma-separated increasing list, "
                        "e.g. 0.1,0.2,0.3", flag="--sparsities", default_help="0.00, 0.01, …, 0.99"),
    "bound": Param(Options(BOUNDS), _D.bound, "p-value and confidence bound", flag="--bound",
                   default_help="auto: paired_exact for accuracy_drop, wsr for the token risks, binomial otherwise"),
    "procedure": Param(Options(PROCEDURES), _D.procedure, "family-wise error control over the levels",
                       flag="--procedure"),
    "tune_fraction": Param(Nullable(Interval(0, 1, closed="left"), expected="a number in [0, 1) or null"),
                           _D.tune_fraction, "share of the data held out (D_tune) for scoring (obd, mu), BatchNorm "
                           "re-estimation, reconstruction, fine-tuning and planning", flag="--tune-fraction",
                           default_help=f"0.25 when needed, {PLANNING_TUNE_FRACTION} when only planned needs it, "
                                        "else 0"),
    "seed": Param(IntRange(0, 2**63 - 1), _D.seed, "seed of the tune/calibration split and of 'random'",
                  flag="--seed"),
    "batch_size": Param(IntRange(1, 1 << 20), _D.batch_size, "evaluation batch size", flag="--batch-size"),
    "device": Param(Options(DEVICES), _D.device, "where to evaluate", flag="--device"),
    "precision": Param(Options(PRECISIONS), _D.precision, "arithmetic of the evaluation, and so of the certified "
                       "model (tf32/bf16/fp16 only on CUDA: the certificate is for the model run that way)",
                       flag="--precision", default_help="fp32, exact"),
    "exclude_first_last": Param(Boolean(), _D.exclude_first_last, "never prune the first and the last prunable "
                                "layer", flag="--exclude-first-last", flag_sets=True),
    "prune_include": Param(Nullable(NamePatterns(empty_hint="An empty list would leave nothing to prune; use null "
                                                            "for the default weights.")), _D.prune_include,
                           "prune only the weights whose parameter name matches one of these glob patterns "
                           "(e.g. 'encoder.*'); can opt in an embedding", flag="--prune-include",
                           default_help="every weight that multiplies an input"),
    "prune_exclude": Param(Nullable(NamePatterns(), null_value=()), _D.prune_exclude,
                           "never prune the weights whose parameter name matches one of these glob patterns",
                           flag="--prune-exclude"),
    "bn_recalibration": Param(_TRUE_FALSE_NULL, _D.bn_recalibration, "keep the dense model's BatchNorm statistics",
                              flag="--no-bn-recalibration", flag_sets=False,
                              default_help="re-estimate them on D_tune when the model has BatchNorm"),
    "bn_statistics": Param(Options(BN_STATISTICS), _D.bn_statistics, "choose: per level the dense, re-estimated or "
                           "blended BatchNorm statistics, whichever a held-out half of D_tune prefers; reestimate: "
                           "always re-estimate on D_tune", flag="--bn-statistics"),
    "full_curve": Param(Boolean(), _D.full_curve, "evaluate every level, also after testing stopped",
                        flag="--full-curve", flag_sets=True),
    "mu_steps": Param(IntRange(2, 100_000), _D.mu_steps, "re-created trajectory length for mu without uploaded "
                      "statistics"),
    "mu_lr": Param(Interval(0, 10, closed="neither"), _D.mu_lr, "relative step per update of mu's re-created "
                   "trajectory"),
    "obd_samples": Param(IntRange(1, 1_000_000), _D.obd_samples, "per-sample gradients averaged for obd's Fisher "
                         "diagonal"),
    "reconstruct": Param(Boolean(), _D.reconstruct, "re-fit the kept weights of each layer on D_tune after masking "
                         "(Optimal Brain Surgeon)", flag="--reconstruct", flag_sets=True),
    "finetune": Param(Switchable(FinetuneConfig, FINETUNE_PARAMETERS, count_field="steps",
                                 count=IntRange(1, 1_000_000),
                                 expected="true, false, a number of steps, or an object with any of 'steps', 'lr', "
                                          "'batch_size', 'loss', 'chain'"),
                      _D.finetune, "fine-tune each level's kept weights on D_tune with its mask fixed; optionally "
                      "the number of steps", flag="--finetune",
                      default_help=f"off; {FinetuneConfig.steps} steps when no number is given"),
    "pattern": Param(Nullable(Options(PATTERNS)), _D.pattern, "semi-structured sparsity: the levels are which "
                     "layers are made 2:4 (no --sparsities)", flag="--pattern", default_help="unstructured"),
    "cudnn_benchmark": Param(_TRUE_FALSE_NULL, _D.cudnn_benchmark, "cuDNN's autotuner; null: only for jobs large "
                             "enough"),
    "output": Param(IndexOrKey(IntRange(-64, 63), max_length=200), _D.output, "which entry of a tuple/list (an "
                    "index) or dict (a key) output is the logits", flag="--output", metavar="INDEX_OR_KEY",
                    default_help="the first tensor, or the dict's 'logits'"),
}


def validate_config(raw: dict[str, Any] | CertifyConfig | None) -> CertifyConfig:
    """Turn user input (a JSON object) into a CertifyConfig, or raise ConfigError naming the field."""
    if raw is None:
        return CertifyConfig()
    if isinstance(raw, CertifyConfig):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ConfigError(f"The config must be a JSON object. Got {type(raw).__name__}.")
    unknown = sorted(set(raw) - set(PARAMETERS))
    if unknown:
        raise ConfigError(
            f"Unknown config field(s): {', '.join(map(repr, unknown))}. "
            f"Valid fields: {', '.join(sorted(PARAMETERS))}.",
            code="unknown_config_field",
        )
    # In the user's order, so the first bad field they wrote is the one reported.
    kw = {key: PARAMETERS[key].constraint.validate(key, value) for key, value in raw.items()}
    # The one cross-field rule: with a pattern the levels are layers, not sparsities.
    if kw.get("pattern") is not None and kw.get("sparsities", default_sparsities()) != default_sparsities():
        raise fail("sparsities", "left at its default when 'pattern' is set", list(kw["sparsities"]),
                   f"With pattern {kw['pattern']!r} the levels are which layers are made {kw['pattern']}, "
                   "not a list of sparsities; remove 'sparsities' or set 'pattern' to null.")
    return CertifyConfig(**kw)


def config_from_values(values: Mapping[str, Any], base: Any = None) -> Any:
    """``base`` (the --config object) with the fields given as flags replaced; still to be validated.

    ``values``: what the command line gave per flagged field (``calibration.params.values_from_options``; the
    click options of ``certify`` and ``submit`` are built from the table in ``service/cli/options.py``).
    A ``base`` that is not an object is returned as it is, for ``validate_config`` to refuse by name.
    """
    if base is not None and not isinstance(base, dict):
        return base
    return {**(base or {}), **values_from_options(values, PARAMETERS)}


def config_only_help() -> str:
    """Epilog lines for the fields that have no flag, so --config's users can find them."""
    top = describe_table(PARAMETERS, [n for n, p in PARAMETERS.items() if p.flag is None])
    sub = describe_table(FINETUNE_PARAMETERS, [n for n, p in FINETUNE_PARAMETERS.items()
                                               if p.flag is None and n != "steps"], prefix="finetune.")
    return "fields settable only in --config:\n" + top + "\n" + sub + "\n"


__all__ = ["CertifyConfig", "FinetuneConfig", "FINETUNE_LOSSES", "validate_config", "default_sparsities",
           "BN_STATISTICS", "CRITERIA", "RISKS", "BOUNDS", "PROCEDURES", "PATTERNS", "PARAMETERS",
           "FINETUNE_PARAMETERS", "config_from_values", "config_only_help"]
