"""Layer-wise mixed precision: per linear, the fastest precision that keeps the model inside a bound.

The plan is made on this machine, for this model, from measurements (no rule of thumb):
  1. Candidates per linear: the model's high precision (fp32), int8 (W8A8 with SmoothQuant, the same
     Int8Linear as `dtype="int8"`) and bf16 weights. Each candidate of each linear is timed alone at a
     representative batch (`tokens` rows, best of several runs); only candidates faster than fp32 are
     moves. bf16 is measured like the rest: on a CPU without native bf16 (no avx512_bf16 / AMX) it is
     several times slower than fp32 and so never chosen there.
  2. Sensitivity: each move alone, the rest fp32, scored end to end on calibration inputs as
     1 - min cosine of the pooled embeddings against the fp32 model's.
  3. Greedy by gain per unit of error: moves sorted by (seconds saved) / (error alone); each is applied
     (a linear already moved moves again only to a faster candidate: bf16, then int8) and kept only if
     the whole model stays inside the bound on the calibration inputs, with half of the error budget
     1 - bound held back (`margin`) for inputs unlike them: a plan that spent all of it on the
     calibration set measured 0.9967 against a 0.999 bound on the public `short` workload.
  (2-3 are skipped when every linear at its fastest precision already keeps the bound on both the
  calibration and the held-out inputs. Where 2-3 would take over SEARCH_BUDGET_S, a large model's
  case, the error of a move is its linear's own output error, all measured in one pass, and the plan
  is the longest prefix of the sorted moves inside the bounds, found by bisection.)
  4. Check on held-out inputs (a different seed of the built-in set, or every other line of the
     user's file): while the bound fails there, the last accepted moves are undone.
  A SPLADE model's masked-LM decoder is one move of its own, made before 2-3: its fastest candidate
  that keeps both bounds with the layers still fp32 (make_plan's `head`).
  5. Where bf16 is native, the whole model in bf16 (activations too) is the plan's alternative,
     taken when it keeps both bounds and runs the calibration inputs faster end to end
     (Encoder._try_whole_bf16): per-linear timings do not see the casts around a bf16 linear in an
     fp32 model, and with AMX the bf16 model outran the plan.
Models: EncoderModel (BERT family) and PreNormEncoderModel (ModernBERT, EmbeddingGemma, decoder
trunks), through `layers`, `linear_names`, `raw_linears`, `planned_linear`, `linears_changed` and
`smooth_quant`.
The plan is a small JSON file beside the model (or in the cache directory when the model directory is
read-only), keyed by the exact bound, the weights' fingerprint and the settings the cosines were
measured under (pooling, input limit, calibration file, alpha, device); `Encoder.load(dtype="auto",
quality_bound=...)` loads it or makes it. Figures: docs/precision.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import native, quantize
from .loader import CheckpointView, weights_fingerprint
from .model import MLM_HEAD_PRECISIONS
from .quantize import LINEARS

log = logging.getLogger("turboserve")

PLAN_VERSION = 5       # 2: calibration texts up to the model limit, half the error budget held back;
                       # 3: the settings it was measured under are part of its key;
                       # 4: a moved linear may move again to a faster precision (bf16 -> int8);
                       # 5: a SPLADE model's head, and the whole model in bf16 as the plan's alternative
HIGH = "fp32"
SLACK = 1e-9          # float64 cosine of identical vectors can read 1 - 2e-16
SEARCH_BUDGET_S = 300.0   # the end-to-end search's estimated passes x the forward time above which the
                          # prefix search runs (make_plan)


@dataclass
class PrecisionPlan:
    """Which precision each linear runs in ("3.fc1" -> "int8"), and what the planner measured."""
    bound: float
    layers: dict[str, str]
    alpha: float = 0.5
    fingerprint: str = ""
    measured: dict = field(default_factory=dict)
    # what else the cosines were measured under (pooling, input limit, calibration file, alpha,
    # device): a plan is reused only under the same ones
    settings: dict = field(default_factory=dict)
    # a SPLADE model's masked-LM decoder (EncoderModel.set_mlm_head), planned as one move of its own
    head: str = HIGH
    # "bf16": the whole model in bf16 instead of the layers' plan, measured inside the bounds and
    # faster end to end (Encoder._try_whole_bf16); None: the plan
    whole: str | None = None

    def precision(self, layer: int, name: str) -> str:
        return self.layers.get(f"{layer}.{name}", HIGH)

    def summary(self) -> str:
        counts: dict[str, list[str]] = {}
        for key, p in sorted(self.layers.items(), key=lambda kv: _key_order(kv[0])):
            counts.setdefault(p, []).append(key)
        parts = []
        for p, keys in sorted(counts.items(), key=lambda kv: -len(kv[1])):
            listed = ", ".join(keys) if len(keys) <= 8 else f"{len(keys)} linears"
            parts.append(f"{p}: {listed}")
        if self.head != HIGH:
            parts.append(f"masked-LM head: {self.head}")
        if self.whole is not None:
            return f"the whole model in {self.whole} (faster end to end than the plan of {'; '.join(parts)})"
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {"version": PLAN_VERSION, "bound": self.bound, "alpha": self.alpha, "fingerprint": self.fingerprint,
                "layers": self.layers, "measured": self.measured, "settings": self.settings, "head": self.head,
                "whole": self.whole}

    @classmethod
    def from_json(cls, data: dict) -> "PrecisionPlan":
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"precision plan version {data.get('version')!r}, expected {PLAN_VERSION}")
        head, whole = data.get("head", HIGH), data.get("whole")
        bad = ({p for p in data["layers"].values() if p not in ("fp32", "bf16", "int8")}
               | ({head} - set(MLM_HEAD_PRECISIONS)) | ({whole} - {None, "bf16"}))
        if bad:
            raise ValueError(f"unknown precisions in plan: {', '.join(sorted(map(str, bad)))}")
        return cls(float(data["bound"]), dict(data["layers"]), float(data.get("alpha", 0.5)),
                   data.get("fingerprint", ""), data.get("measured", {}), dict(data.get("settings", {})), head, whole)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "PrecisionPlan":
        return cls.from_json(json.loads(Path(path).read_text()))


LINEAR_ORDER = (*LINEARS, "up", "down")     # the BERT family's names, then the pre-norm layers' (fc1 / gate|up)


def _key_order(key: str):
    layer, name = key.split(".")
    return int(layer), LINEAR_ORDER.index(name)


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def plan_paths(model_dir: Path, bound: float, settings: dict) -> list[Path]:
    """Where a plan for `bound` and `settings` is looked for, in order: beside the model, then the
    cache directory (the bound exactly: repr, not %g's six digits, which made 0.9999995 and 1 one file)."""
    name = f"turboserve-precision-{bound!r}-{settings_key(settings)}.json"
    return [Path(model_dir) / name, native.cache_dir() / "precision" / weights_fingerprint(model_dir) / name]


def save_plan(plan: PrecisionPlan, model_dir: Path) -> Path:
    for path in plan_paths(model_dir, plan.bound, plan.settings):
        try:
            plan.save(path)
            return path
        except OSError:
            continue
    raise OSError(f"cannot write a precision plan beside {model_dir} or in the cache directory")


def find_plan(model_dir: Path, bound: float, settings: dict) -> PrecisionPlan | None:
    """A saved plan for exactly this bound and these settings whose fingerprint matches the weights
    on disk, if any."""
    fp = weights_fingerprint(model_dir)
    for path in plan_paths(model_dir, bound, settings):
        if path.exists():
            try:
                plan = PrecisionPlan.load(path)
            except (ValueError, KeyError, json.JSONDecodeError) as exc:
                log.warning("ignoring precision plan %s: %s", path, exc)
                continue
            if plan.fingerprint == fp and plan.bound == bound and plan.settings == settings:
                return plan
    return None


# ------------------------------------------------------------------------- building blocks
class Candidates:
    """Every linear of `model` prebuilt in every candidate precision, so trying a plan is a swap.
    `model`: an EncoderModel or a PreNormEncoderModel, through what both offer the planner (their
    `layers` and `linear_names`, raw_linears, planned_linear, linears_changed); `stats` (SmoothQuant's
    input ranges) only where the model's int8 takes them (`smooth_quant`)."""

    def __init__(self, model, view: CheckpointView, stats, alpha: float, precisions):
        self.model = model
        self.built: dict[tuple[int, str], dict[str, object]] = {}
        for i, layer in enumerate(model.layers):
            raw = model.raw_linears(view, i)
            for name in model.linear_names:
                weight, bias = raw[name]
                built = {HIGH: getattr(layer, name)}
                for p in precisions:
                    if p == HIGH:
                        continue
                    smooth = None
                    if p == "int8" and model.smooth_quant and alpha > 0:
                        smooth = quantize.smoothing_factors(stats[(i, name)], weight, alpha)
                    built[p] = model.planned_linear(weight, bias, p, smooth)
                self.built[(i, name)] = built

    def apply(self, assignment: dict[tuple[int, str], str]) -> None:
        for (i, name), versions in self.built.items():
            setattr(self.model.layers[i], name, versions[assignment.get((i, name), HIGH)])
        self.model.linears_changed()


def pooled(model, batches, embed) -> torch.Tensor:
    """embed(hidden, batch) of `model`'s forward pass over `batches`, float64 [N, D]."""
    return torch.cat([embed(model.forward(b), b) for b in batches]).double()


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def _time_linear(lin, x: torch.Tensor, prequantized: bool, ops, repeat: int = 5) -> float:
    """Seconds for one call as the forward pass makes it: an int8 linear's input arrives quantized by
    the producer's epilogue, except the attention output projection's, which it quantizes itself."""
    out = torch.empty(x.shape[0], lin.out_features, device=x.device)
    kw = {}
    if lin.takes_int8:
        _, xq = ops.epilogue(x, quant_for=lin) if prequantized else (None, None)
        kw = {"acc": torch.empty(x.shape[0], lin.out_features, dtype=torch.int32, device=x.device)}
    else:
        xq = None
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)     # GPU kernels run asynchronously
    best = float("inf")
    for _ in range(repeat + 1):
        sync()
        t = time.perf_counter()
        lin(x, xq, out=out, **kw)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def make_plan(model, view: CheckpointView, calib_batches, heldout_batches, embed,
              bound: float, alpha: float = 0.5, precisions=("int8", "bf16"), tokens: int = 1024,
              model_dir: Path | None = None, margin: float = 0.5, settings: dict | None = None,
              head=None, references: dict | None = None) -> PrecisionPlan:
    """Plan and apply: on return `model` runs the plan's linears. `model` must be the fp32 model.
    embed(hidden, batch) -> [B, D]: the embeddings whose cosines are bounded (the model's pooling).
    head: the model again where `embed` runs its masked-LM head (SPLADE), whose decoder is then
    planned too (mlm_head_timings, set_mlm_head). references: a dict to receive the fp32 model's
    embeddings of both input sets ("calib", "held"), for comparisons after the plan.
    margin: the share of the error budget (1 - bound) kept unspent on the calibration inputs."""
    plan_bound = 1.0 - (1.0 - bound) * (1.0 - margin)
    t0 = time.perf_counter()
    stats = quantize.input_absmax(model, calib_batches) if model.smooth_quant else None
    cands = Candidates(model, view, stats, alpha, precisions)
    t_forward = time.perf_counter()
    ref_calib = pooled(model, calib_batches, embed)
    t_forward = time.perf_counter() - t_forward
    ref_held = pooled(model, heldout_batches, embed)
    if references is not None:
        references.update(calib=ref_calib, held=ref_held)

    # 1. time: every candidate of every linear at `tokens` rows, a decoder's int8 ones with the kernel
    #    choice they will run with (ops/cpu.py tune_int8_rows)
    tune = getattr(model.ops, "tune_int8_rows", None)
    if tune is not None:
        tune([lin for versions in cands.built.values() for lin in versions.values()])
    gen = torch.Generator().manual_seed(0)
    timings: dict[tuple[int, str], dict[str, float]] = {}
    inputs = {}
    for key, versions in cands.built.items():
        k_in = versions[HIGH].in_features
        x = inputs.setdefault(k_in, torch.randn(tokens, k_in, generator=gen).to(model.device))
        timings[key] = {p: _time_linear(lin, x, key[1] != "o", model.ops) for p, lin in versions.items()}

    # 2. sensitivity of each move alone
    def score(assignment, batches, ref) -> float:
        cands.apply(assignment)
        return min_cosine(pooled(model, batches, embed), ref)

    # a SPLADE model's masked-LM decoder (hidden x vocabulary: as many FLOPs as 3-4 encoder layers, so
    # its gain per error leads every single linear's) moves first, on its own: the fastest precision
    # that, the layers still fp32, keeps both bounds. The layers' moves then spend what is left
    head_p, head_times = HIGH, {}
    if head is not None:
        head_times = head.mlm_head_timings()
        failed = set()
        for p in sorted((p for p in head_times if head_times[p] < head_times[HIGH]), key=head_times.get):
            if p.split()[0] in failed:       # int8 and int8 native: the same arithmetic, the same error
                continue
            head.set_mlm_head(p)
            if (score({}, calib_batches, ref_calib) >= plan_bound - SLACK
                    and score({}, heldout_batches, ref_held) >= bound - SLACK):
                head_p = p
                break
            failed.add(p.split()[0])
        head.set_mlm_head(head_p)

    # first, every linear at its fastest measured precision: when that is inside the bound (bert-base
    # at 0.999 is), it is the plan, and the per-move search (360 s there) is not needed
    fastest = {key: min(t, key=t.get) for key, t in timings.items()}
    fastest = {key: p for key, p in fastest.items() if p != HIGH}
    shortcut = False
    if fastest:
        cos = score(fastest, calib_batches, ref_calib)
        shortcut = cos >= plan_bound - SLACK and score(fastest, heldout_batches, ref_held) >= bound - SLACK

    # each move's error alone: end to end (a forward pass per move), or where that would take more
    # than SEARCH_BUDGET_S (a 0.6B decoder trunk: 224 moves at 40 s a pass, hours) each linear's
    # own output error, all measured in one instrumented pass, and the plan a prefix of the sorted moves
    faster = [(key, p) for key, t in ({} if shortcut else timings).items() for p in precisions
              if t[HIGH] - t[p] > 0]
    prefix_search = 2 * len(faster) * t_forward > SEARCH_BUDGET_S
    local = _local_errors(model, cands, calib_batches) if prefix_search and faster else {}
    moves = []
    for key, p in faster:
        gain = timings[key][HIGH] - timings[key][p]
        if prefix_search:
            err = local.get(key, {}).get(p, 0.0)
        else:
            err = max(1.0 - score({key: p}, calib_batches, ref_calib), 0.0)
        moves.append((gain / (err + 1e-7), key, p, gain, err))
    moves.sort(key=lambda m: -m[0])

    # 3. greedy, end to end on the calibration inputs. A linear already moved may move again to a
    # faster candidate: where bf16 is native its moves cost almost no error and come first, and
    # without this second move every linear stopped at bf16 (MiniLM on an avx512_bf16 CPU: all 24
    # linears bf16 at 52% of fp32's linear time, calibration cosine 0.99995 against a 0.9995 bound)
    assignment: dict[tuple[int, str], str] = dict(fastest) if shortcut else {}
    accepted = []          # (linear, the precision it had before)
    calib_cos = cos if shortcut else 1.0
    if prefix_search:
        assignment, calib_cos, held_cos, prefix = _prefix_plan(moves, timings, score, calib_batches, ref_calib,
                                                               plan_bound, heldout_batches, ref_held, bound)
    for _, key, p, gain, err in ([] if prefix_search else moves):
        before = assignment.get(key, HIGH)
        if timings[key][p] >= timings[key][before]:
            continue          # no faster than where it already is
        trial = {**assignment, key: p}
        cos = score(trial, calib_batches, ref_calib)
        if cos >= plan_bound - SLACK:
            assignment, calib_cos = trial, cos
            accepted.append((key, before))

    # 4. held-out check, undoing the last accepted moves while it fails
    held_cos = held_cos if prefix_search else score(assignment, heldout_batches, ref_held)
    undone = 0
    while accepted and held_cos < bound - SLACK:
        key, before = accepted.pop()
        if before == HIGH:
            assignment.pop(key)
        else:
            assignment[key] = before
        undone += 1
        held_cos = score(assignment, heldout_batches, ref_held)
    cands.apply(assignment)
    model.dtype_name = "mixed" if assignment or head_p != HIGH else HIGH

    est_high = sum(t[HIGH] for t in timings.values())
    est_plan = sum(timings[k][assignment.get(k, HIGH)] for k in timings)
    layers = {f"{i}.{n}": assignment.get((i, n), HIGH) for (i, n) in sorted(timings)}
    measured = {
        "calibration_bound": round(plan_bound, 6),
        "all_fastest_within_bound": shortcut,
        "search": (f"the first {prefix} of {len(moves)} moves sorted by local error" if prefix_search
                   else "greedy, end to end") if moves else None,
        "calibration_forward_s": round(t_forward, 2),
        "calibration_min_cosine": round(calib_cos if assignment else 1.0, 6),
        "heldout_min_cosine": round(held_cos, 6),
        "undone_on_heldout": undone,
        "linear_ms_at_tokens": {f"{i}.{n}": {p: round(s * 1e3, 3) for p, s in t.items()}
                                for (i, n), t in sorted(timings.items())},
        "tokens": tokens,
        "linear_time_fraction_of_fp32": round(est_plan / est_high, 4),
        "head_ms_at_tokens": {p: round(s * 1e3, 3) for p, s in head_times.items()},
        "threads": torch.get_num_threads(),
        "planned_in_s": round(time.perf_counter() - t0, 1),
    }
    return PrecisionPlan(bound, layers, alpha, weights_fingerprint(model_dir) if model_dir else "", measured,
                         dict(settings or {}), head_p)


def _local_errors(model, cands: Candidates, batches) -> dict[tuple[int, str], dict[str, float]]:
    """Each linear's relative output error in each candidate precision, ||y_p - y|| / ||y|| over the
    calibration inputs it receives in the fp32 model: one forward pass with every linear wrapped (each
    call also runs its candidates on the same input)."""
    sums: dict[tuple[int, str], dict[str, list[float]]] = {}

    class Probe:
        takes_int8 = False

        def __init__(self, key, versions):
            self.key, self.versions, self.high = key, versions, versions[HIGH]

        def __getattr__(self, name):
            return getattr(self.high, name)

        def __call__(self, x, xq=None, **kw):
            rows = x.shape[0]
            ref = self.high(x, None, out=torch.empty(rows, self.high.out_features, dtype=x.dtype,
                                                     device=x.device))[0].float()
            acc = sums.setdefault(self.key, {})
            norm = float(ref.pow(2).sum())
            for p, lin in self.versions.items():
                if p != HIGH:
                    y = lin(x, None, out=torch.empty(rows, lin.out_features, dtype=lin.dtype, device=x.device))[0]
                    a = acc.setdefault(p, [0.0, 0.0])
                    a[0] += float((y.float() - ref).pow(2).sum())
                    a[1] += norm
            return self.high(x, xq, **kw)

    for (i, name), versions in cands.built.items():
        setattr(model.layers[i], name, Probe((i, name), versions))
    try:
        for b in batches:
            model.forward(b)
    finally:
        cands.apply({})
    return {key: {p: (e / max(n, 1e-30)) ** 0.5 for p, (e, n) in acc.items()} for key, acc in sums.items()}


def _prefix_plan(moves, timings, score, calib_batches, ref_calib, plan_bound, held_batches, ref_held, bound):
    """The longest prefix of the sorted moves inside the calibration bound, then (shortened while it
    fails) the held-out one, by bisection: about 2 log2(moves) forward passes. A prefix's assignment
    gives each linear the fastest precision among its moves there (the empty prefix is the fp32 model,
    cosine 1). Returns (assignment, calibration cosine, held-out cosine, prefix length)."""
    def assignment(k):
        a = {}
        for _, key, p, _, _ in moves[:k]:
            if timings[key][p] < timings[key][a.get(key, HIGH)]:
                a[key] = p
        return a

    def longest(hi, batches, ref, target):
        """The largest k in [0, hi] whose prefix scores >= target, and its cosine."""
        lo, best = 0, 1.0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            cos = score(assignment(mid), batches, ref)
            if cos >= target - SLACK:
                lo, best = mid, cos
            else:
                hi = mid - 1
        return lo, best
    k, calib_cos = longest(len(moves), calib_batches, ref_calib, plan_bound)
    held_cos = score(assignment(k), held_batches, ref_held) if k else 1.0
    if held_cos < bound - SLACK:
        k, held_cos = longest(k - 1, held_batches, ref_held, bound)
        calib_cos = score(assignment(k), calib_batches, ref_calib) if k else 1.0
    return assignment(k), calib_cos, held_cos, k


def apply_plan(model, view: CheckpointView, plan: PrecisionPlan, calib_batches, head=None) -> None:
    """Swap `model`'s (fp32) linears for the plan's. int8 linears need the calibration statistics.
    head: as make_plan's (the model, where the embeddings run its masked-LM head)."""
    if plan.head != HIGH and head is None:
        raise ValueError("precision plan moves a masked-LM head, which this model's pooling does not run")
    wanted = {p for p in plan.layers.values()} - {HIGH}
    stats = quantize.input_absmax(model, calib_batches) if "int8" in wanted and model.smooth_quant else None
    cands = Candidates(model, view, stats, plan.alpha, sorted(wanted))
    assignment = {}
    for key, p in plan.layers.items():
        i, name = key.split(".")
        if (int(i), name) not in cands.built:
            raise ValueError(f"precision plan names {key!r}, which this model does not have")
        if p != HIGH:
            assignment[(int(i), name)] = p
    cands.apply(assignment)
    if head is not None:
        head.set_mlm_head(plan.head)
    model.dtype_name = "mixed" if assignment or plan.head != HIGH else HIGH
