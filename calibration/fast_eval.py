"""Fast top-1 predictions of the live (masked in place) model on a resident input tensor.

The engine evaluates the same module on the same calibration tensor once per sparsity level;
only the *values* of the weights change between levels (``masks.apply_masks`` writes into
``p.data``, so every parameter keeps its storage). That makes the evaluation a textbook case
for CUDA graphs: capture one forward of a fixed batch shape once, then per batch copy the
inputs into the static buffer and replay. A replay reads the weights from the same addresses,
so it sees the newly masked values (and BN statistics re-estimated in place) without
recapture. ``tests/calibration/test_fast_eval.py`` checks this on the device.

Levers, all on CUDA only (on the CPU, :class:`Predictor` is exactly the engine's historical
``predict`` loop, batch by batch, so results are bit-identical there):

- ``torch.backends.cudnn.benchmark`` (cuDNN's autotuner) only where the job is large enough to
  amortise it (:func:`cudnn_benchmark_rule`; set for the predictor's life, restored afterwards).
  On an H200 it cost ≈ 26 s per fp32 ResNet-50 job (n = 2000, 224×224) for ≈ 3 % of the testing
  phase (≈ 7 s for ≈ 15 % at 112×112), and nothing in bf16: off unless the job runs thousands of batches.
- CUDA-graph capture of the forward for the full-batch shape, after warm-up runs on a side
  stream (TorchScript's profiling executor optimises and compiles fusion groups during the
  first runs; they must not happen during capture). The graph is validated once against the
  eager forward on the same batch; any failure (a model that synchronises, data-dependent
  control flow, …) falls back to eager evaluation, and :meth:`Predictor.describe` says why.
- A ragged last batch runs eagerly (no padding: a model whose output for one sample depends on
  the others in its batch is evaluated on exactly the batches the eager loop would form).
- argmax on the device into one preallocated output; one host transfer per level.
- Precision: ``fp32`` exactly by default (tf32 off — ``engine.evaluation_precision`` sets the
  flags). ``tf32`` only when asked. ``bf16``/``fp16`` run the forward under autocast (weight
  casts are *not* cached, so masked weights are re-read every forward) and, with
  :meth:`Predictor.resident`, keep the resident calibration inputs in that dtype too, halving
  their memory. The certificate then holds for the model as run in that precision, which the
  report says.
- Memory layout: NCHW or channels_last (NHWC), chosen once by timing both (like cuDNN's own
  benchmark): on an H200, NHWC was 2.3× faster for ResNet-18 at 32×32 in fp32 and 1.5× for
  ResNet-50 in bf16, but 11 % slower for ResNet-50 in fp32. The choice is made before the dense
  pass and kept for every level, so all passes use the same kernels. The trial itself costs about
  ``LAYOUT_TRIAL_COST_BATCHES[precision]`` batch forwards, so a job too small to amortise it
  (:func:`layout_trial_rule`, from the job's expected batch forwards) takes the precision's usual
  winner instead (:func:`default_channels_last`: NHWC for bf16/fp16, NCHW for fp32/tf32).

What shapes the evaluation never depends on D_cal's values (SPEC §1: D_cal only computes
p-values). The resident dtype is decided from D_tune (:meth:`Predictor.decide_resident`; with no
D_tune, the inputs stay in their own dtype), D_tune is rounded to that dtype too (so BN statistics
are estimated on inputs rounded exactly like D_cal's), and the layout is timed on D_tune or on a
synthetic tensor of the batch's shape (:meth:`Predictor.choose_layout`), never on a D_cal batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator

import torch

from .errors import CancelledError, ModelError
from .inputs import ModelInputs, call, select_output

CheckFn = Callable[[torch.Tensor, torch.Tensor], None]
ErrorFn = Callable[[torch.Tensor, BaseException], None]

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FP16_MAX = 65504.0


class _NotCapturable(RuntimeError):
    pass


# cuDNN's autotuner (``cudnn.benchmark``): what it cost and bought, fp32 ResNet-50 on an H200, measured
# (bench/job_cost.py, bench/NOTES_gpu.md): at 224×224 ≈ 26 s of tuning (≈ 200 forwards of a 500-row batch)
# for ≈ 3 % off the levels; at 112×112 ≈ 7 s (≈ 150 batch forwards) for ≈ 15 %. In bf16 it bought nothing
# (the levels ran slower with it). Rule: tuning ≈ 200 batch forwards, gain 10 % (between the two) → on from
# ≈ 2,000 batch forwards in fp32/tf32 (n ≈ 50,000 over 20 levels at batch 500), never in bf16/fp16 by itself.
AUTOTUNE_COST_BATCHES = 200.0
AUTOTUNE_GAIN = {"fp32": 0.10, "tf32": 0.10, "bf16": 0.0, "fp16": 0.0}


def cudnn_benchmark_rule(requested: bool | None, expected_batches: int, precision: str = "fp32") -> bool:
    """Whether to run cuDNN's autotuner for a job that will run ``expected_batches`` batch forwards.

    ``requested`` (the config's ``cudnn_benchmark``) wins when set. Otherwise (auto): on only where the
    expected saving, ``expected_batches × gain(precision)``, exceeds the tuning's own cost of about
    ``AUTOTUNE_COST_BATCHES`` forwards. Decided from counts fixed before D_cal is looked at.
    """
    if requested is not None:
        return bool(requested)
    gain = AUTOTUNE_GAIN.get(precision, 0.0)
    return gain > 0 and expected_batches * gain > AUTOTUNE_COST_BATCHES


# TorchScript's profiling graph executor (torch's default) profiles each new input shape on its first run, then
# optimises the graph for it on the second (on a GPU: TensorExpr fusion, generating and compiling kernels).
# Measured on an H200 (bench/jit_warmup.py, a fresh process per setting): a traced 134 M-parameter Llama, bf16,
# batch 64 × 128 tokens: the optimising run took 3.27 s, after which a forward took 7.9 ms against 12.5 ms
# unoptimised (−37 %); bench/lm_gpu.py's job spent 10.5 s of 15.7 in such warm-ups (two batch shapes and the
# graph capture). ResNet-50 at 224×224, batch 500: optimising cost about one forward and bought nothing (65.8 vs
# 65.8 ms; bf16 46.5 vs 46.4 ms). Rule: optimising ≈ 420 batch forwards per shape, gain ≈ 35 % → on from ≈ 1,200
# batch forwards; below that the graph runs as traced or scripted, and one warm-up run is enough (nothing to
# profile).
GRAPH_OPTIMIZE_COST_BATCHES = 420.0
GRAPH_OPTIMIZE_GAIN = 0.35


def graph_optimization_rule(expected_batches: int | None) -> bool:
    """Whether TorchScript's graph executor should profile and optimise (fuse) the model's graph for a job of
    ``expected_batches`` batch forwards: where the expected saving exceeds the optimisation's own cost.
    Unknown size (None): torch's default, on. Decided from counts fixed before D_cal is looked at."""
    if expected_batches is None:
        return True
    return expected_batches * GRAPH_OPTIMIZE_GAIN > GRAPH_OPTIMIZE_COST_BATCHES

# The layout trial (NCHW vs channels-last): 2 × (LAYOUT_WARMUP + 1 timed) full-batch forwards, plus the losing
# layout's first-run costs (TorchScript re-profiling for the new strides, cuDNN heuristics, kernel loads), which the
# winner pays in the dense pass anyway. Measured before this change (3 warm-ups + 2 timed each, 10 forwards):
# 1.1 s for ResNet-50 fp32 at 112×112 on an H200, ≈ 20 forwards' worth; now 6 forwards + ≈ 6 of first-run costs.
# What it buys over the default: fp32's usual winner (NCHW: ResNet-50 by 11 %) lost to NHWC by 2.3× for ResNet-18 at
# 32×32, so a wrong default can cost half of every batch: expected regret 0.25 of the job's forwards in fp32/tf32; in
# bf16/fp16 NHWC won every case measured (ResNet-50 1.5×): 0.1.
# The trial times a quarter of the batch (at least LAYOUT_TRIAL_MIN_ROWS rows; still hundreds of images for the
# jobs where the layout matters): at full batch it took 1.15–1.30 s for ResNet-50 fp32 at 224×224 on an H200 (8.6–9.8
# batch forwards' worth); at a quarter, 0.53–0.62 s (4.0–4.7), and it picked the same layout (NCHW by 14 %, both
# ways). In bf16 its fixed part dominates: 0.86 s, of which the dense pass then saves 0.38 s of warm-ups, net ≈ 14
# forwards of 35 ms. Cost in batch forwards per precision; on from 20 batch forwards in fp32, 150 in bf16.
LAYOUT_WARMUP = 2  # the profiling executor profiles on the first run and optimises on the second
LAYOUT_TRIAL_COST_BATCHES = {"fp32": 5.0, "tf32": 5.0, "bf16": 15.0, "fp16": 15.0}
LAYOUT_TRIAL_FRACTION = 4  # the trial's rows: the batch's rows // this
LAYOUT_TRIAL_MIN_ROWS = 64
LAYOUT_REGRET = {"fp32": 0.25, "tf32": 0.25, "bf16": 0.10, "fp16": 0.10}


def default_channels_last(precision: str) -> bool:
    """The layout that usually wins without a trial: NHWC for tensor-core math (bf16/fp16), NCHW for fp32/tf32."""
    return precision in ("bf16", "fp16")


def layout_trial_rule(expected_batches: int | None, precision: str = "fp32") -> bool:
    """Whether timing both memory layouts can pay for itself in a job of ``expected_batches`` batch forwards.

    On where the expected saving over :func:`default_channels_last`, ``expected_batches × regret(precision)``,
    exceeds the trial's own cost of about ``LAYOUT_TRIAL_COST_BATCHES[precision]`` forwards. Unknown size
    (None): always.
    Decided from counts fixed before D_cal is looked at (``engine.expected_batch_forwards``).
    """
    if expected_batches is None:
        return True
    return expected_batches * LAYOUT_REGRET.get(precision, 0.25) > LAYOUT_TRIAL_COST_BATCHES.get(precision, 5.0)


def _integer_valued(x: torch.Tensor, rows: int = 1024) -> bool:
    """Whether every value is an integer, in row chunks (no full-size temporaries)."""
    flat = x.reshape(x.shape[0], -1) if x.dim() > 1 else x.reshape(-1, 1)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        if not bool(torch.all(chunk == torch.round(chunk))):
            return False
    return True


def resident_dtype_rule(reference: torch.Tensor | None, dtype: torch.dtype,
                        autocast_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype inputs of ``dtype`` are kept resident in, decided from ``reference`` (D_tune) only.

    bf16/fp16: the reduced dtype (half the memory; the first autocast op would round them the same
    way anyway), unless the reference shows integer-valued inputs beyond the 8-bit (bf16) or 11-bit
    (fp16) exact range — token ids, say — or values beyond fp16's range. No reference (no D_tune):
    ``dtype`` unchanged, since nothing but D_cal could tell, and D_cal must not.
    """
    if autocast_dtype is None or not dtype.is_floating_point or dtype == autocast_dtype:
        return dtype
    if reference is None or reference.numel() == 0 or not reference.is_floating_point():
        return dtype
    lo, hi = torch.aminmax(reference)  # a reduction: no full-size temporary
    amax = max(-float(lo), float(hi))
    exact_int = 256 if autocast_dtype == torch.bfloat16 else 2048
    integer_valued = amax > exact_int and _integer_valued(reference)
    if integer_valued or (autocast_dtype == torch.float16 and amax > _FP16_MAX):
        return dtype
    return autocast_dtype


def effective_precision(precision: str, device: torch.device) -> str:
    """What the arithmetic really is: reduced precisions exist on CUDA only; elsewhere fp32."""
    return precision if device.type == "cuda" else "fp32"


class Predictor:
    """Top-1 predictions of ``module`` (evaluated as it is *now*) over a resident tensor.

    Use as a context manager around the whole evaluation (it sets ``cudnn.benchmark`` to
    ``cudnn_benchmark`` and restores it, and frees the captured graph on exit)::

        with Predictor(module, 512, device=device, precision="fp32") as predictor:
            x = predictor.resident(x)
            dense = predictor.predict(x)
            apply_masks(...)
            pruned = predictor.predict(x)
    """

    def __init__(
        self,
        module: torch.nn.Module,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        precision: str = "fp32",
        cuda_graph: bool | None = None,
        channels_last: bool | None = None,
        warmup: int = 3,
        cudnn_benchmark: bool = False,
        output: int | str | None = None,
        expected_batches: int | None = None,
        graph_optimization: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if device is None:
            first = next(iter(module.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.module = module
        self.output = output  # which entry of a tuple/dict output is the logits (calibration.inputs.select_output)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.precision = precision
        self.is_cuda = self.device.type == "cuda"
        self.autocast_dtype = _AUTOCAST.get(precision) if self.is_cuda else None
        self.use_graph = self.is_cuda and (True if cuda_graph is None else bool(cuda_graph))
        # None (auto): decided on the first batch by timing both layouts (see _choose_format).
        self.channels_last: bool | None = (None if channels_last is None else bool(channels_last)) \
            if self.is_cuda else False
        self.format_ms: dict[str, float | int] | None = None
        # Without the graph executor's optimisation nothing is profiled or compiled: one warm-up run suffices.
        self.graph_optimization = bool(graph_optimization)
        self.warmup = max(1, int(warmup)) if self.graph_optimization else 1
        self._old_optimize: bool | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_x: torch.Tensor | None = None
        self._static_logits: torch.Tensor | None = None
        self._graph_key: tuple[Any, ...] | None = None
        self._warmed: set[tuple[Any, ...]] = set()
        self.graph_error: str | None = None
        self.graph_replays = 0
        self.eager_batches = 0
        self.resident_dtype: torch.dtype | None = None
        self.resident_decided_from: str | None = None  # "tuning split" | "input dtype (no tuning split)"
        self.layout_decided_from: str | None = None
        self._old_benchmark: bool | None = None
        self.cudnn_benchmark = bool(cudnn_benchmark) and self.is_cuda
        self.setup_s = 0.0  # host seconds in first-forward warm-ups and graph captures (synchronised)
        self.expected_batches = expected_batches  # the job's size: whether the layout trial pays (layout_trial_rule)

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> "Predictor":
        if self.is_cuda:
            self._old_benchmark = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        # The executor's flag is per thread: every forward of a job runs in the thread that entered here.
        self._old_optimize = torch._C._get_graph_executor_optimize()
        torch._C._set_graph_executor_optimize(self.graph_optimization)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        if self._old_benchmark is not None:
            torch.backends.cudnn.benchmark = self._old_benchmark
            self._old_benchmark = None
        if self._old_optimize is not None:
            torch._C._set_graph_executor_optimize(self._old_optimize)
            self._old_optimize = None

    def release(self) -> None:
        """Drop the captured graph and its static buffers (its memory pool goes with them)."""
        self._graph = None
        self._static_x = None
        self._static_logits = None
        self._graph_key = None

    def describe(self) -> dict[str, Any]:
        """How the predictions were computed (for the report and the benchmark)."""
        return {
            "batch_size": self.batch_size,
            "device": self.device.type,
            "precision": self.precision,
            "effective_precision": effective_precision(self.precision, self.device),
            "cuda_graph": self.graph_replays > 0,
            "cuda_graph_error": self.graph_error,
            "graph_replays": self.graph_replays,
            "eager_batches": self.eager_batches,
            "channels_last": bool(self.channels_last),
            "format_ms": self.format_ms,
            "resident_dtype": str(self.resident_dtype).replace("torch.", "") if self.resident_dtype else None,
            "resident_dtype_from": self.resident_decided_from,
            "layout": ("channels_last" if self.channels_last else "nchw") if self.is_cuda else None,
            "layout_from": self.layout_decided_from,
            "cudnn_benchmark": self.cudnn_benchmark,
            "graph_optimization": self.graph_optimization,
            "setup_s": round(self.setup_s, 4),
            "warmup_runs": self.warmup if self.is_cuda else 0,
        }

    # ------------------------------------------------------------------ inputs

    def decide_resident(self, tune: torch.Tensor | None, dtype: torch.dtype) -> torch.dtype:
        """Fix the resident dtype for inputs of ``dtype`` from D_tune (``tune``) alone (see
        :func:`resident_dtype_rule`); :meth:`resident` and :meth:`rounded` then apply it to any split."""
        if isinstance(tune, ModelInputs) or dtype is None:
            # Several inputs: the floating ones are kept reduced only if the rule allows it for each.
            floats = [t for t in tune.tensors if t.is_floating_point()] if tune is not None else []
            rules = {resident_dtype_rule(t, t.dtype, self.autocast_dtype) for t in floats}
            self.resident_dtype = rules.pop() if len(rules) == 1 else torch.float32
        else:
            self.resident_dtype = resident_dtype_rule(tune, dtype, self.autocast_dtype)
        self.resident_decided_from = ("tuning split" if tune is not None and tune.numel() else
                                      "input dtype (no tuning split)")
        return self.resident_dtype

    def resident(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs as they stay resident on the device for this precision: converted to the dtype
        fixed by :meth:`decide_resident` (called first by the engine, on D_tune). Used on its own, the
        rule is applied to ``x`` itself."""
        if self.resident_dtype is None:
            self.decide_resident(x, None if isinstance(x, ModelInputs) else x.dtype)
            self.resident_decided_from = "these inputs"
        if isinstance(x, ModelInputs):
            return x.map(lambda t: t.to(self.resident_dtype) if t.is_floating_point() and
                         t.dtype != self.resident_dtype else t)
        target = self.resident_dtype if x.is_floating_point() else x.dtype
        return x if x.dtype == target else x.to(target)

    def rounded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with its values rounded exactly as :meth:`resident` rounds them, in its own dtype (for
        D_tune: scores, BN re-estimation and reconstruction see inputs rounded like D_cal's)."""
        r = self.resident(x)
        if isinstance(x, ModelInputs):
            return ModelInputs(x.names, [a if a.dtype == b.dtype else a.to(b.dtype)
                                         for a, b in zip(r.tensors, x.tensors)])
        return r if r.dtype == x.dtype else r.to(x.dtype)

    def choose_layout(self, example: torch.Tensor, source: str) -> None:
        """Decide NCHW vs channels-last once, by timing both on ``example`` (a D_tune batch, or a
        synthetic tensor of the batch's shape and resident dtype): never on D_cal."""
        if not self.is_cuda or self.channels_last is not None:
            return
        if self._layout_by_default(example):
            return
        self._time_layouts(example)
        self.layout_decided_from = source

    def _layout_by_default(self, example: torch.Tensor) -> bool:
        """Take the precision's usual layout without a trial when the job is too small to amortise one."""
        precision = effective_precision(self.precision, self.device)
        if layout_trial_rule(self.expected_batches, precision):
            return False
        self.channels_last = (default_channels_last(precision) and isinstance(example, torch.Tensor)
                              and example.dim() == 4 and example.is_floating_point())
        self.layout_decided_from = (f"default for {precision} (no trial: {self.expected_batches} batch forwards "
                                    "do not amortise it)")
        return True

    # ------------------------------------------------------------------ forward

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # cache_enabled=False: never reuse a cast of a weight across forwards (the weights change
        # in place between levels; a replayed graph re-runs the cast kernels and so re-reads them).
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _format(self, xb: torch.Tensor) -> torch.Tensor:
        if self.channels_last and xb.dim() == 4:
            return xb.contiguous(memory_format=torch.channels_last)
        return xb

    def _forward(self, xb: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return select_output(call(self.module, xb), self.output)

    @torch.no_grad()
    def forward(self, xb: torch.Tensor, fn: Callable[[torch.Tensor], Any] | None = None) -> Any:
        """One eager forward of the module as it is now (training mode included), or of ``fn`` (another
        function of the same module), in the evaluation precision and memory layout: for passes that
        must not replay the graph, such as BN re-estimation, which runs in train mode and updates buffers."""
        with self._autocast():
            return call(self.module if fn is None else fn, self._format(xb))

    def _eager(self, xb: torch.Tensor, on_error: ErrorFn | None) -> torch.Tensor:
        self.eager_batches += 1
        try:
            return self._forward(self._format(xb))
        except (CancelledError, ModelError):  # ModelError: an output that holds no logits (select_output)
            raise
        except Exception as exc:
            if on_error is not None:
                on_error(xb, exc)
            raise

    def _key(self, xb: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(xb.shape) if not isinstance(xb, ModelInputs) else tuple(tuple(t.shape) for t in xb.tensors),
                xb.dtype, xb.device, self.autocast_dtype, self.channels_last,
                bool(self.module.training))

    def _capture(self, xb: torch.Tensor) -> None:
        """Warm up on a side stream, capture the forward for ``xb``'s shape, keep it only if it
        reproduces the (warmed-up) eager forward's predictions on the same batch."""
        key = self._key(xb)
        static_x = self._format(xb).clone()
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup - 1):
                    self._forward(static_x)
                # A forward that synchronises with the host (.item(), data-dependent control flow)
                # cannot be captured, and a failed capture can leave CUDA's RNG state unusable:
                # find out on an ordinary run first.
                old_mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    reference = self._forward(static_x)
                except RuntimeError as exc:
                    raise _NotCapturable(f"the forward synchronises with the host ({str(exc).strip()[:120]})") from exc
                finally:
                    torch.cuda.set_sync_debug_mode(old_mode)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_logits = self._forward(static_x)
            if not isinstance(static_logits, torch.Tensor):
                raise RuntimeError(f"the captured forward returned {type(static_logits).__name__}, not a tensor")
            graph.replay()
            if not torch.equal(static_logits.argmax(dim=-1), reference.argmax(dim=-1)):
                raise RuntimeError("the replayed graph's predictions differ from the eager forward's")
        except Exception as exc:  # fall back to eager, say why
            text = str(exc).strip()
            self.graph_error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            self.use_graph = False
            self.release()
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            return
        self._graph, self._static_x, self._static_logits, self._graph_key = graph, static_x, static_logits, key

    def _time_forward(self, xb: torch.Tensor, runs: int = 2) -> float:
        best = math.inf
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self._forward(xb)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        return best

    def _choose_format(self, xb: torch.Tensor, check: CheckFn | None, on_error: ErrorFn | None) -> None:
        """channels_last or not, when :meth:`choose_layout` was not called first: the contract check on
        the first batch, then timing on a synthetic tensor of its shape (cuDNN's fastest kernels for a
        layer are NHWC for tensor-core math and small images, NCHW for some fp32 layers)."""
        # Timed on the full batch: on an H200 an eighth of it was a poor proxy (ResNet-18 fp32:
        # 2.67 vs 2.58 ms at 312 rows, but 29.6 vs 13.0 ms at 2500). The price is one batch of
        # activations in the losing layout, once, before the dense pass.
        first = self._eager(xb, on_error)  # the contract check comes first: bad models fail here
        if check is not None:
            check(xb, first)
        del first
        if self._layout_by_default(xb):
            return
        # Timed on a synthetic tensor of the batch's shape and dtype: the choice never reads the values.
        synthetic = torch.randn(xb.shape, device=xb.device).to(xb.dtype) if xb.is_floating_point() else xb
        self._time_layouts(synthetic)
        self.layout_decided_from = "synthetic tensor of the batch shape"

    def _time_layouts(self, xb: torch.Tensor) -> None:
        if xb.dim() != 4 or not xb.is_floating_point():
            self.channels_last = False
            return
        times = {}
        xb = xb[:max(min(LAYOUT_TRIAL_MIN_ROWS, xb.shape[0]), xb.shape[0] // LAYOUT_TRIAL_FRACTION)]
        for cl in (False, True):
            xf = xb.contiguous(memory_format=torch.channels_last) if cl else xb.contiguous()
            for _ in range(min(self.warmup, LAYOUT_WARMUP)):
                self._forward(xf)
            times[cl] = self._time_forward(xf, runs=1)  # the layouts that matter differ by ≥ 10 %, runs by ~1 %
            del xf
        self.channels_last = times[True] < times[False]
        self.format_ms = {"rows": int(xb.shape[0]), "nchw": round(times[False], 3),
                          "channels_last": round(times[True], 3)}

    def _batch_logits(self, xb: torch.Tensor, check: CheckFn | None, on_error: ErrorFn | None) -> torch.Tensor:
        if not self.is_cuda:
            return self._eager(xb, on_error)
        if self.channels_last is None:
            self._choose_format(xb, check, on_error)
        key = self._key(xb)
        if key not in self._warmed:
            t_setup = time.perf_counter()
            # First batch of this shape: check the model's contract on the first forward, then
            # warm up (TorchScript profiles and optimises during the first runs) so that every
            # batch that counts — of the dense pass and of every level — runs the same optimised
            # graph, and capture it where possible.
            first = self._eager(xb, on_error)
            if check is not None:
                check(xb, first)
            graphable = (self.use_graph and xb.shape[0] == self.batch_size and not self.module.training
                         and self._graph is None and isinstance(first, torch.Tensor) and first.dim() in (2, 3))
            if graphable:
                self._capture(xb)
            else:
                for _ in range(self.warmup - 1):
                    self._eager(xb, on_error)
            self._warmed.add(key)
            torch.cuda.synchronize(self.device)
            self.setup_s += time.perf_counter() - t_setup
        if self._graph is not None and self._graph_key == key:
            self._static_x.copy_(xb)  # type: ignore[union-attr]
            self._graph.replay()
            self.graph_replays += 1
            return self._static_logits  # type: ignore[return-value]
        return self._eager(xb, on_error)

    @torch.no_grad()
    def logits_batches(self, x: torch.Tensor, should_stop: Callable[[], bool] | None = None,
                       on_error: ErrorFn | None = None,
                       check: CheckFn | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, xb, logits)`` per batch of ``batch_size`` rows, in order.

        ``logits`` may be the graph's static output buffer: use it before the next step.
        ``on_error(xb, exc)`` is called (and may raise its own error) when the forward fails;
        ``check(xb, logits)`` also runs on the very first forward of a new batch shape, before
        any warm-up or capture.
        """
        bs = self.batch_size
        for start in range(0, x.shape[0], bs):
            if should_stop is not None and should_stop():
                raise CancelledError()
            xb = x[start:start + bs]
            yield start, xb, self._batch_logits(xb, check, on_error)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, should_stop: Callable[[], bool] | None = None, *,
                check: CheckFn | None = None, on_error: ErrorFn | None = None) -> torch.Tensor:
        """Top-1 predictions ``(n,)`` int64 on ``x``'s device.

        ``check(xb, logits)`` runs on every batch's logits (the engine's model-contract check on
        the dense pass) before they are reduced to predictions.
        """
        if not self.is_cuda:
            # Exactly the historical loop: batch, forward, argmax, concatenate.
            out = []
            for _, xb, logits in self.logits_batches(x, should_stop, on_error, check):
                if check is not None:
                    check(xb, logits)
                out.append(logits.argmax(dim=-1))  # (N,) for (N, classes); (N, T) for (N, T, V) logits
            return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=x.device)
        preds: torch.Tensor | None = None  # allocated on the first batch: (n,) or (n, T) per-position top-1
        for start, xb, logits in self.logits_batches(x, should_stop, on_error, check):
            if check is not None:
                check(xb, logits)
            if preds is None:
                preds = torch.empty((x.shape[0], *logits.shape[1:-1]), dtype=torch.int64, device=x.device)
            preds[start:start + xb.shape[0]] = logits.argmax(dim=-1)
        return preds if preds is not None else torch.empty(0, dtype=torch.int64, device=x.device)

    __call__ = predict


__all__ = ["GRAPH_OPTIMIZE_COST_BATCHES", "GRAPH_OPTIMIZE_GAIN", "LAYOUT_REGRET", "LAYOUT_TRIAL_COST_BATCHES", "Predictor",
           "cudnn_benchmark_rule", "default_channels_last", "graph_optimization_rule",
           "effective_precision", "layout_trial_rule", "resident_dtype_rule"]
