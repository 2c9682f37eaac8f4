"""The one benchmark harness: timing, input rotation, machine peaks, results, tables, plots.

Timing (:func:`time_fn`): the function is first called untimed (warm-up, compilation, autotuning),
then its cost is estimated from a few calls, then it is warmed up for ``warmup_ms`` and timed
``rep_ms`` worth of calls (at least ``min_reps``). Every call gets the next of several input sets
(rotation), and on CUDA the L2 cache is overwritten before each timed call, as
``triton.testing.do_bench`` does, so no call finds its inputs in a cache the previous call warmed.
On CUDA each call is timed on the device with its own pair of CUDA events; on the CPU with
``time.perf_counter``. Results are the median and the 20th / 80th percentiles of the per-call times.

Results (:class:`Report`): a list of :class:`Result` rows (section, variant name, parameters,
timing, derived metrics, note) with the machine's description, written after every row as
``results.json`` and ``results.md``; the "vs ref" column is the reference's median time divided by
the row's (above 1: faster than the reference) among rows with the same section and parameters.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def _set_environ(values: Dict[str, Optional[str]]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def environ(**values: Optional[str]):
    """Environment variables set (a string) or unset (None) inside the block, restored after it."""
    before = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(before)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), ``0 <= q <= 1``."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of no values")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Per-call times in milliseconds and their summary."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    reps: int

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> "Timing":
        return cls(quantile(samples_ms, 0.5), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8),
                   min(samples_ms), len(samples_ms))


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
_L2_FLUSH: Dict[torch.device, torch.Tensor] = {}


# GPU-side wait before each timed call: enough cycles (about 2 GHz) to cover 1.5x the host time of
# a call as measured on the probe calls (at least 0.1 ms, at most HIDE_LAUNCH_CYCLES, about 4 ms)
HIDE_LAUNCH_CYCLES = 8_000_000
_CYCLES_PER_MS = 2_000_000


def _flush_l2(device: torch.device) -> None:
    """Overwrite the GPU's L2 cache (256 MB of writes, as triton.testing.do_bench does)."""
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
    buf.zero_()


class _CpuEvent:
    """CPU stand-in for ``torch.cuda.Event(enable_timing=True)``."""

    def __init__(self):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_CpuEvent") -> float:
        return (end.t - self.t) * 1e3


def event(device: torch.device):
    """A timing event for ``device``: ``e.record()``, ``start.elapsed_time(end)`` in ms."""
    if device.type == "cuda":
        return torch.cuda.Event(enable_timing=True)
    return _CpuEvent()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, input_sets: Sequence[Tuple] = ((),), device: Optional[torch.device] = None, *,
            warmup_ms: float = 25.0, rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000,
            setup: Optional[Callable[[Tuple], None]] = None, flush_l2: bool = True, probes: int = 3) -> Timing:
    """Time ``fn(*input_sets[i % n])`` per call; see the module docstring.

    ``setup(inputs)`` runs before each call outside the timed region (e.g. to clear gradients);
    ``probes`` calls estimate the cost that sizes the warm-up and the number of timed calls.
    """
    device = torch.device(device or "cpu")
    sets = list(input_sets) or [()]
    counter = [0]
    hide = [HIDE_LAUNCH_CYCLES]
    host_ms = []

    def call(timed_events=None):
        inputs = sets[counter[0] % len(sets)]
        counter[0] += 1
        if setup is not None:
            setup(inputs)
        if timed_events is None:
            fn(*inputs)
            return
        if flush_l2 and device.type == "cuda":
            _flush_l2(device)
        if device.type == "cuda":
            # a GPU-side wait before the start event, so that the host has queued the call by the
            # time it starts: the timing is the device's, not Python's launch overhead
            torch.cuda._sleep(hide[0])
        timed_events[0].record()
        t0 = time.perf_counter()
        fn(*inputs)
        host_ms.append((time.perf_counter() - t0) * 1e3)
        timed_events[1].record()

    call()  # first call: compilation, autotuning, allocator warm-up
    synchronize(device)
    probe = [(event(device), event(device)) for _ in range(max(1, probes))]
    for ev in probe:
        call(ev)
    synchronize(device)
    hide[0] = int(min(HIDE_LAUNCH_CYCLES, max(0.1, 1.5 * max(host_ms)) * _CYCLES_PER_MS))
    est = max(1e-4, sum(s.elapsed_time(e) for s, e in probe) / len(probe))
    for _ in range(max(1, min(1000, int(warmup_ms / est)))):
        call()
    reps = max(min_reps, min(max_reps, int(rep_ms / est)))
    events = [(event(device), event(device)) for _ in range(reps)]
    for ev in events:
        call(ev)
    synchronize(device)
    return Timing.from_samples([s.elapsed_time(e) for s, e in events])


def rotation_count(bytes_per_set: int, device: torch.device, most: int = 4) -> int:
    """How many input sets to rotate: at least 2, at most ``most``, and no more than fits in a
    memory allowance (4 GiB on CUDA, 512 MiB on the CPU)."""
    allowance = (4 << 30) if torch.device(device).type == "cuda" else (512 << 20)
    return max(2, min(most, allowance // max(1, int(bytes_per_set))))


# ----------------------------------------------------------------------------------------------
# machine description and peaks
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    if os.environ.get("BENCH_COMMIT"):  # where the checkout has no (current) git metadata
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Device name, versions, date: what a results file must say about where it came from."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {
        "device_type": device.type,
        "device": None,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   compute_capability=f"{props.major}.{props.minor}", driver_cuda=torch.version.cuda)
    else:
        env["device"] = f"CPU, {os.cpu_count()} cores ({env['cpu']})"
        env["torch_threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):  # other work on the machine shows up in the spread of the timings
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
    return env


def machine_slug(env: Dict[str, Any]) -> str:
    """Short file-name-safe machine name: ``nvidia-h100-80gb-hbm3``, ``cpu-2core-torch2.13``."""
    if env.get("device_type") == "cuda":
        name = env.get("device") or "cuda"
    else:
        name = f"cpu-{env.get('cpu_cores')}core"
    ver = re.match(r"(\d+\.\d+)", env.get("torch") or "")
    name = f"{name}-torch{ver.group(1)}" if ver else name
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, rep_ms: float = 200.0) -> float:
    """Achievable memory bandwidth in GB/s (1e9 bytes/s) from a large device-to-device copy
    (``nbytes`` read plus ``nbytes`` written per call; 1 GiB on CUDA, 128 MiB on the CPU)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, rep_ms=rep_ms, min_reps=5, flush_l2=False)
    del src, dst
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


def measure_matmul_peak(device: torch.device, dtype: Optional[torch.dtype] = None, n: Optional[int] = None,
                        rep_ms: float = 200.0) -> Tuple[float, torch.dtype]:
    """Achievable matmul throughput in TFLOP/s from an ``n x n x n`` product (``2 n^3`` FLOPs):
    bfloat16, n = 8192 on CUDA; float32, n = 1024 on the CPU. Returns (TFLOP/s, dtype)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), device=device, rep_ms=rep_ms, min_reps=5, flush_l2=False)
    return 2 * n ** 3 / (t.median_ms * 1e-3) / 1e12, dtype


# ----------------------------------------------------------------------------------------------
# correctness before timing
# ----------------------------------------------------------------------------------------------
def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref| / max(1, max |ref|)``, computed in float64."""
    if x.numel() == 0:
        return 0.0
    ref = ref.detach().double()
    return float((x.detach().double() - ref).abs().max() / ref.abs().max().clamp(min=1.0))


def close_enough(out: torch.Tensor, ref_exact: torch.Tensor, ref_same_dtype: torch.Tensor, floor: float,
                 factor: float = 2.0) -> Tuple[bool, float, float]:
    """The kernel tests' rule: the error of ``out`` against an exact (float64) reference is at most
    ``factor`` times the error of PyTorch's own computation in the same dtype, plus ``floor``
    (errors relative to ``max(1, max |reference|)``). Returns (ok, error, bound)."""
    if tuple(out.shape) != tuple(ref_exact.shape):
        return False, float("inf"), 0.0
    err = relative_error(out, ref_exact)
    bound = factor * relative_error(ref_same_dtype, ref_exact) + floor
    return (math.isfinite(err) and err <= bound), err, bound


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
@dataclass
class Result:
    """One row: ``name`` (variant) of ``section`` at ``params``; ``timing`` None for a skipped row."""

    section: str
    name: str
    params: Dict[str, Any]
    timing: Optional[Timing] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    note: str = ""
    reference: bool = False  # the row the others of its group are compared with
    speedup: Optional[float] = None  # filled by Report

    def to_json(self) -> Dict[str, Any]:
        d = {"section": self.section, "name": self.name, "params": self.params, "reference": self.reference}
        if self.timing is not None:
            d.update(median_ms=self.timing.median_ms, p20_ms=self.timing.p20_ms, p80_ms=self.timing.p80_ms,
                     min_ms=self.timing.min_ms, reps=self.timing.reps)
        d["speedup_vs_reference"] = self.speedup
        d["metrics"] = self.metrics
        if self.note:
            d["note"] = self.note
        return d


def _group_key(r: Result) -> Tuple:
    return (r.section, tuple(sorted((k, str(v)) for k, v in r.params.items())))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1e-4:
            return f"{v:#.3g}" if a < 1 else f"{v:.2f}"
        return f"{v:.2e}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v).replace("|", "/")


SECTION_TITLES = {
    "peaks": "Machine peaks",
    "attention": "Shifted-window cosine attention (grid 64 x 8, window 4 x 4, 16 heads x 32)",
    "fbank": "Log-mel front end (10 s clips at 16 kHz -> [B, 1, 1024, 128])",
    "step_ops": "Training-step ops (ViT-B shapes, mask ratio 0.8)",
    "pretrain": "Pretraining step",
    "pretrain_breakdown": "Pretraining step, time per phase",
}


class Report:
    """Collects results and writes ``results.json`` and ``results.md`` into ``out_dir``."""

    def __init__(self, out_dir: Optional[str], env: Dict[str, Any], config: Optional[Dict[str, Any]] = None):
        self.out_dir = out_dir
        self.env = env
        self.config = config or {}
        self.peaks: Dict[str, Any] = {}
        self.results: List[Result] = []
        self.notes: Dict[str, List[str]] = {}
        self.section_notes: Dict[str, str] = {}  # one paragraph per section: what the columns mean
        self.section_meta: Dict[str, Dict[str, Any]] = {}  # shapes and settings shared by a section's rows

    # -- collecting --
    def add(self, result: Result, save: bool = True) -> Result:
        self.results.append(result)
        self._speedups()
        if save:
            self.save()
        return result

    def note(self, section: str, text: str, save: bool = True) -> None:
        if text not in self.notes.setdefault(section, []):
            self.notes[section].append(text)
        if save:
            self.save()

    def describe(self, section: str, text: str, **meta: Any) -> None:
        """What a section's columns mean (markdown), and the shapes / settings its rows share (JSON)."""
        self.section_notes[section] = text
        self.section_meta[section] = {"description": text, **meta}

    def _speedups(self) -> None:
        refs = {_group_key(r): r for r in self.results if r.reference and r.timing is not None}
        for r in self.results:
            ref = refs.get(_group_key(r))
            r.speedup = (ref.timing.median_ms / r.timing.median_ms
                         if ref is not None and r.timing is not None and r.timing.median_ms > 0 else None)

    def sections(self) -> List[str]:
        seen: List[str] = []
        for s in list(self.notes) + [r.section for r in self.results]:
            if s not in seen:
                seen.append(s)
        return seen

    # -- writing --
    def to_json(self) -> Dict[str, Any]:
        return {"environment": self.env, "config": self.config, "peaks": self.peaks, "sections": self.section_meta,
                "results": [r.to_json() for r in self.results], "notes": self.notes}

    def markdown(self) -> str:
        env = self.env
        lines = [f"# audiomae benchmarks: {env.get('device')}", ""]
        facts = [("device", env.get("device")), ("GPU memory (GiB)", env.get("gpu_memory_gib")),
                 ("compute capability", env.get("compute_capability")), ("CPU", env.get("cpu")),
                 ("CPU cores", env.get("cpu_cores")), ("torch threads", env.get("torch_threads")),
                 ("load average (1 min, at start)", env.get("load_average_1min")),
                 ("torch", env.get("torch")), ("triton", env.get("triton")),
                 ("CUDA", env.get("cuda")), ("python", env.get("python")), ("date", env.get("date")),
                 ("commit", env.get("commit"))]
        lines += [f"- {k}: {_fmt(v)}" for k, v in facts if v is not None]
        if self.config:
            lines.append("- run: " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.config.items()))
        if self.peaks:
            lines.append("- measured peaks: " + ", ".join(f"{k} {_fmt(v)}" for k, v in self.peaks.items()))
        lines += ["", "Times are per call: median and 20th-80th percentile over the timed calls, after warm-up, "
                  "with inputs rotated between calls. `vs ref` = the reference's median / this median "
                  "(above 1: faster).", ""]
        for section in self.sections():
            lines += self._section_markdown(section)
        return "\n".join(lines) + "\n"

    def _section_markdown(self, section: str) -> List[str]:
        rows = [r for r in self.results if r.section == section]
        out = [f"## {SECTION_TITLES.get(section, section)}", ""]
        if section in self.section_notes:
            out += [self.section_notes[section], ""]
        if rows:
            pkeys: List[str] = []
            mkeys: List[str] = []
            for r in rows:
                pkeys += [k for k in r.params if k not in pkeys]
                mkeys += [k for k in r.metrics if k not in mkeys]
            has_ref = any(r.speedup is not None for r in rows)
            head = ["variant"] + pkeys + ["median ms", "p20-p80 ms"] + (["vs ref"] if has_ref else []) + mkeys
            if any(r.note for r in rows):
                head.append("note")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            for r in rows:
                t = r.timing
                cells = [r.name + (" (ref)" if r.reference else "")] + [_fmt(r.params.get(k)) for k in pkeys]
                cells += [_fmt(t.median_ms), f"{_fmt(t.p20_ms)}-{_fmt(t.p80_ms)}"] if t else ["", ""]
                if has_ref:
                    cells.append(f"{r.speedup:.2f}x" if r.speedup is not None else "")
                cells += [_fmt(r.metrics.get(k)) for k in mkeys]
                if "note" in head:
                    cells.append(_fmt(r.note))
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        for n in self.notes.get(section, []):
            out.append(f"- {n}")
        if self.notes.get(section):
            out.append("")
        return out

    def save(self) -> None:
        if not self.out_dir:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        _atomic_write(os.path.join(self.out_dir, "results.json"), json.dumps(self.to_json(), indent=1, default=str))
        _atomic_write(os.path.join(self.out_dir, "results.md"), self.markdown())


def _atomic_write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


KEPT_NOTE = "kept from an earlier run in this folder"


def _origin(data: Dict[str, Any]) -> Dict[str, Any]:
    """Where the rows of an earlier ``results.json`` were measured: its run's commit, date, versions,
    settings and measured peaks."""
    env = data.get("environment") or {}
    return {"commit": env.get("commit"), "date": env.get("date"), "torch": env.get("torch"),
            "triton": env.get("triton"), "config": data.get("config") or {}, "peaks": data.get("peaks") or {}}


def _origin_note(origin: Dict[str, Any]) -> str:
    parts = [f"commit {origin.get('commit')}", str(origin.get("date")), f"torch {origin.get('torch')}"]
    config = {k: v for k, v in (origin.get("config") or {}).items() if k != "sections"}
    if config:
        parts.append("run: " + ", ".join(f"{k}={_fmt(v)}" for k, v in config.items()))
    if origin.get("peaks"):
        parts.append("its measured peaks: " + ", ".join(f"{k} {_fmt(v)}" for k, v in origin["peaks"].items()))
    return f"{KEPT_NOTE} ({'; '.join(parts)})"


def _aside(out_dir: str, stem_tag: str) -> str:
    """A free name ``results-<tag>[-N]`` for moving earlier files aside."""
    tag, n = stem_tag, 1
    while any(os.path.exists(os.path.join(out_dir, f"{stem}-{tag}{ext}"))
              for stem, ext in (("results", ".json"), ("results", ".md"), ("attention", ".png"), ("profile", ".txt"))):
        n += 1
        tag = f"{stem_tag}-{n}"
    return tag


def keep_earlier_sections(report: Report, running: Sequence[str]) -> List[str]:
    """Before a run writes into a folder that holds an earlier run's ``results.json``: on the same
    device, the rows, notes and descriptions of the sections not run now are kept, each section with
    a note of the run that measured it (commit, date, settings, peaks; carried over when a folder is
    merged again); on another device, or when the file cannot be read, the earlier files are moved
    aside (``results-<date>.json`` / ``.md``, ``attention-<date>.png``, ``profile-<date>.txt``), so
    nothing is lost. A stale ``attention.png`` (``profile.txt``) goes when the attention (pretraining)
    section runs again; it is written anew by that section. Returns the sections kept."""
    if not report.out_dir:
        return []
    out = report.out_dir
    path = os.path.join(out, "results.json")
    kept: List[str] = []

    def rerun(section: str) -> bool:  # a section's own tables (e.g. pretrain_breakdown) go with it
        return section == "peaks" or any(section == s or section.startswith(s + "_") for s in running)

    if os.path.isfile(path):
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            old_env = data.get("environment") or {}
            rows = results_from_json(data)
            problem = None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            data, old_env, rows, problem = None, {}, [], f"cannot be read ({type(e).__name__}: {e})"
        if data is not None and old_env.get("device") == report.env.get("device"):
            rows = [r for r in rows if not rerun(r.section)]
            notes = data.get("notes") or {}
            metas = data.get("sections") or {}
            kept = sorted({r.section for r in rows} | {s for s in notes if not rerun(s)})
            report.results.extend(rows)
            for section in kept:
                meta = dict(metas.get(section) or {})
                origin = meta.get("measured_in") or _origin(data)  # kept before: its own origin stays
                meta["measured_in"] = origin
                report.section_meta[section] = meta
                if meta.get("description"):
                    report.section_notes[section] = meta["description"]
                report.notes[section] = [_origin_note(origin)] + [
                    n for n in notes.get(section, []) if not str(n).startswith(KEPT_NOTE)]
        else:
            stamp = "unreadable" if problem else str(old_env.get("date") or "earlier")
            tag = _aside(out, stamp.replace(" ", "-").replace(":", ""))
            for name in ("results.json", "results.md", "attention.png", "profile.txt"):
                src = os.path.join(out, name)
                if os.path.isfile(src):
                    stem, ext = os.path.splitext(name)
                    os.replace(src, os.path.join(out, f"{stem}-{tag}{ext}"))
            why = problem or f"from another device ({old_env.get('device')})"
            print(f"{path}: {why}; moved aside as results-{tag}.json", flush=True)
    for section, name in (("attention", "attention.png"), ("pretrain", "profile.txt")):
        stale = os.path.join(out, name)
        if section in running and section not in kept and os.path.isfile(stale):
            os.remove(stale)
    return kept


def results_from_json(data: Dict[str, Any]) -> List[Result]:
    """The rows of a ``results.json`` (for re-plotting a run without repeating it)."""
    rows = []
    for d in data.get("results", []):
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in d.get("params", {}).items()}
        t = (Timing(d["median_ms"], d["p20_ms"], d["p80_ms"], d.get("min_ms", d["p20_ms"]), d.get("reps", 0))
             if "median_ms" in d else None)
        rows.append(Result(d["section"], d["name"], params, t, d.get("metrics", {}), d.get("note", ""),
                           d.get("reference", False), d.get("speedup_vs_reference")))
    return rows


# ----------------------------------------------------------------------------------------------
# time budgets
# ----------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock allowance in seconds; ``left()`` never goes below 0."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return max(0.0, self.seconds - self.used())

    def expired(self) -> bool:
        return self.left() <= 0.0

    def part(self, fraction: float, at_least: float = 0.0) -> "Budget":
        """A sub-budget: ``fraction`` of the total, at least ``at_least``, at most what is left."""
        return Budget(min(self.left(), max(at_least, fraction * self.seconds)))


@dataclass
class Context:
    """What a section needs: device, sweep size, report, budget, options, and the machine peaks
    (measured once per run, on first use)."""

    device: torch.device
    quick: bool
    report: Report
    budget: Budget
    options: Dict[str, Any] = field(default_factory=dict)
    _bandwidth: Optional[float] = None
    _matmul: Optional[Tuple[float, torch.dtype]] = None

    def timing_args(self) -> Dict[str, Any]:
        return dict(warmup_ms=10.0, rep_ms=40.0, min_reps=5) if self.quick else dict(warmup_ms=25.0, rep_ms=100.0,
                                                                                     min_reps=10)

    def bandwidth_gbps(self) -> float:
        if self._bandwidth is None:
            self._bandwidth = measure_copy_bandwidth(self.device)
            self.report.peaks["copy bandwidth (GB/s)"] = self._bandwidth
            self.report.save()
        return self._bandwidth

    def matmul_tflops(self) -> Tuple[float, torch.dtype]:
        if self._matmul is None:
            self._matmul = measure_matmul_peak(self.device)
            name = str(self._matmul[1]).replace("torch.", "")
            self.report.peaks[f"{name} matmul (TFLOP/s)"] = self._matmul[0]
            self.report.save()
        return self._matmul


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def error_note(e: BaseException, prefix: str = "failed: ") -> str:
    """One line for a results note: "out of memory", or the exception's type and first line."""
    if is_oom(e):
        return "out of memory"
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{prefix}{type(e).__name__}: {first}"


def free_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def plot_sweep(results: Iterable[Result], path: str, x: str, panels: Sequence[str], title: str,
               y: str = "median_ms", ylabel: str = "ms per call (median; bars p20-p80)") -> Optional[str]:
    """One line per variant of ``y`` against parameter ``x``, one panel per distinct combination of
    the ``panels`` parameters; log-log axes. Returns the path, or None when nothing was timed or
    matplotlib is missing."""
    rows = [r for r in results if r.timing is not None and x in r.params]
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception:
        return None
    keys: List[Tuple] = []
    for r in rows:
        k = tuple(r.params.get(p) for p in panels)
        if k not in keys:
            keys.append(k)
    ncols = min(2, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        sub = [r for r in rows if tuple(r.params.get(p) for p in panels) == k]
        names: List[str] = []
        for r in sub:
            if r.name not in names:
                names.append(r.name)
        for name in names:
            pts = sorted((r.params[x], r.timing) for r in sub if r.name == name)
            xs = [p[0] for p in pts]
            med = [p[1].median_ms for p in pts]
            lo = [p[1].median_ms - p[1].p20_ms for p in pts]
            hi = [p[1].p80_ms - p[1].median_ms for p in pts]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted({r.params[x] for r in sub})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(", ".join(f"{p}={_fmt(v)}" for p, v in zip(panels, k)), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the title
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

