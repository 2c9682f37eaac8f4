"""Run every benchmark this machine supports and write ``results.md``, ``results.json`` and
``attention.png`` into ``benchmarks/results/<machine>/`` (or ``--out``).

    python -m benchmarks.run                      # everything, on CUDA when available
    python -m benchmarks.run --quick --only attention,fbank
    python -m benchmarks.run --batch auto         # pretraining step at the largest batch that fits
    python benchmarks/run.py --device cpu --out /tmp/bench

Sections: ``attention``, ``fbank``, ``step_ops``, ``pretrain``. Results are written after every
measurement, so a run that is stopped keeps what it measured; the results of sections not run now
that an earlier run on the same device left in the folder are kept. ``--time-budget`` caps the whole run:
each section gets a share of what is left and stops measuring when its share is used up (what it
skipped is noted in the results).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402

SECTIONS = ("attention", "fbank", "step_ops", "pretrain")
PRETRAIN_COLUMNS = ("eager", "fused", "compile")
SHARES = {"attention": 0.35, "fbank": 0.1, "step_ops": 0.1, "pretrain": 0.45}
RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated sections to run (default all): {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="fewer timed calls and a smaller CPU sweep")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<machine>)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: CUDA when available, else the CPU")
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (default: no limit)")
    p.add_argument("--batch", default=None,
                   help="pretraining batch: a number, or 'auto' to search the largest that fits "
                        "(default: auto on CUDA, 2 on the CPU)")
    p.add_argument("--model", default="base", help="AudioMAEConfig preset of the pretraining step (default base)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column of the pretraining step")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of that column (default: torch's default; e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--compile-options", default=None, metavar="KEY=VALUE,...",
                   help="inductor options of that column instead of a mode (torch.compile(options=...)), e.g. "
                        "coordinate_descent_tuning=true or max_autotune_gemm=true,max_autotune_gemm_backends=TRITON")
    p.add_argument("--op-backends", default=None, metavar="OP=BACKEND,...",
                   help="also run the fused and compiled pretraining columns with these ops' backends forced, "
                        "next to the automatic choice (the eager column stays on the references), e.g. "
                        "gelu_mlp=triton to measure the fused MLP")
    p.add_argument("--profile", action="store_true",
                   help="also write profile.txt: the kernels of two pretraining steps per column (torch.profiler)")
    p.add_argument("--pretrain-columns", default=None,
                   help="comma-separated from eager,fused,compile (default all on CUDA, eager on the CPU)")
    p.add_argument("--attention-batches", default=None,
                   help="comma-separated batch sizes (default 32,64,128,256 on CUDA; 1,2,4,8 on the CPU)")
    p.add_argument("--attention-dtypes", default=None, help="comma-separated from fp32,bf16,fp16 "
                                                              "(default bf16,fp16 on CUDA; fp32,bf16 on the CPU)")
    p.add_argument("--variants", default=None, help="comma-separated attention variant names or parts of them, "
                                                     "e.g. triton,cuda (default all; the reference always runs)")
    p.add_argument("--fbank-batch", type=int, default=None, help="clips per fbank call (default 64 on CUDA)")
    p.add_argument("--step-batch", type=int, default=None, help="batch of the step-op benchmarks (default 64 on CUDA)")
    p.add_argument("--tuning", metavar="TUNE_JSON", default=None,
                   help="run the Triton attention (and the fused MLP, when the file has its rows) with the "
                        "fastest tiling per direction of this tune.json "
                        "(python -m benchmarks.tune --out DIR) instead of the defaults; the report records it")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import this module (a dotted name on the path, or a .py file) before the run, e.g. "
                        "one that registers attention variants with @variant; repeatable")
    p.add_argument("--list-variants", action="store_true", help="print the attention variants and exit")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="redraw DIR/attention.png from DIR/results.json (no measuring) and exit")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.sections = only or list(SECTIONS)
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")
    try:
        args.attention_batches_list = _csv(args.attention_batches, int)
    except ValueError:
        p.error(f"--attention-batches {args.attention_batches}: expected comma-separated whole numbers")
    if args.attention_batches_list and min(args.attention_batches_list) < 1:
        p.error(f"--attention-batches {args.attention_batches}: batch sizes must be at least 1")
    from benchmarks.attention import DTYPES

    dtypes = _csv(args.attention_dtypes) or ()
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--attention-dtypes: unknown {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    if args.batch not in (None, "", "auto", "default"):
        try:
            ok = int(args.batch) >= 1
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--batch {args.batch}: expected a whole number of at least 1, or auto")
    columns = _csv(args.pretrain_columns) or ()
    bad = [c for c in columns if c not in PRETRAIN_COLUMNS]
    if bad:
        p.error(f"--pretrain-columns: unknown {', '.join(bad)}; choose from {', '.join(PRETRAIN_COLUMNS)}")
    for flag in ("fbank_batch", "step_batch"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {v}")
    if args.compile_options is not None:
        if args.compile_mode:
            p.error("--compile-mode and --compile-options exclude each other (torch.compile takes one of them)")
        try:
            args.compile_options = inductor_options(args.compile_options)
        except ValueError as e:
            p.error(f"--compile-options: {e}")
    if args.op_backends is not None:
        try:
            args.op_backends = op_backends(args.op_backends)
        except ValueError as e:
            p.error(f"--op-backends: {e}")
    return args


def _pairs(text: str, form: str) -> List[tuple]:
    """``"a=b,c=d"`` -> [("a", "b"), ("c", "d")] (spaces and empty items ignored); ``form`` (e.g.
    "key=value") names what is expected in the ValueError for a malformed item or an empty list."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"expected {form}, got {item!r}")
        out.append((key, value))
    if not out:
        raise ValueError(f"no {form} given")
    return out


def op_backends(text: str) -> dict:
    """``"op=backend,..."`` -> {op: backend}, each op one of :func:`audiomae.dispatch.registered_ops`
    and each backend one of :data:`audiomae.dispatch.BACKENDS`. Raises ValueError naming what is wrong."""
    from audiomae import dispatch

    for module in ("audiomae.ops", "audiomae.ops_step"):  # importing them registers the ops
        importlib.import_module(module)

    known = dispatch.registered_ops()
    out = {}
    for op, backend in _pairs(text, "op=backend"):
        if op not in known:
            raise ValueError(f"unknown op {op!r}; the ops are {', '.join(known)}")
        if backend not in dispatch.BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for {op}; choose one of {', '.join(dispatch.BACKENDS)}")
        out[op] = backend
    return out


def inductor_options(text: str) -> dict:
    """``"key=value,..."`` -> the ``options`` of ``torch.compile``: each key an inductor config entry
    (``torch._inductor.config``, dotted for its sub-configs), each value parsed as a bool (true/false),
    an int, a float or else kept as a string. Raises ValueError naming what is wrong."""
    import torch._inductor.config as config

    out = {}
    for key, value in _pairs(text, "key=value"):
        node = config
        for part in key.split("."):
            if not hasattr(node, part):
                raise ValueError(f"torch._inductor.config has no entry {key!r}")
            node = getattr(node, part)
        if value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out


def _tune_rows(path: str) -> list:
    """The rows of a ``tune.json``; SystemExit naming the file when it cannot be read."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise SystemExit(f"--tuning {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--tuning {path}: not JSON ({e})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SystemExit(f"--tuning {path}: expected the JSON object of python -m benchmarks.tune, with a list of "
                         "rows")
    return rows


def best_attention_tiling(path: str) -> dict:
    """``{"fwd": {...}, "bwd": {...}}``: per direction, the tiling of the fastest attention row of a
    ``tune.json`` (rows that failed or were not timed are skipped), in the form of
    ``audiomae.kernels.window_attention.TUNING``."""
    rows = _tune_rows(path)
    keys = ("block_m", "num_warps", "heads_fast", "groups_per_program")
    out = {}
    for direction in ("fwd", "bwd"):
        timed = [r for r in rows if r.get("kernel") == "attention" and r.get("direction") == direction and "ms" in r]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            tiling = {k: best[k] for k in keys if k in best}
            if not tiling:
                raise SystemExit(f"--tuning {path}: its fastest {direction} attention row names no tiling "
                                 f"({', '.join(keys)})")
            out[direction] = tiling
    if not out:
        raise SystemExit(f"--tuning: {path} has no timed attention rows")
    return out


def best_mlp_tiling(path: str) -> dict:
    """``{"fwd": ..., "bwd": ...}``: per half of the fused MLP, the tiling of its fastest
    ``method="triton"`` row of a ``tune.json``, or ``"torch"`` where the ``method="torch"`` row
    (cuBLAS and PyTorch's GELU) was faster than every tiling; in the form of
    ``audiomae.kernels.gelu_mlp.TUNING`` (empty when the file has no timed MLP rows)."""
    rows = _tune_rows(path)
    keys = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
    out = {}
    for direction in ("fwd", "bwd"):
        timed = [r for r in rows if r.get("kernel") == "mlp" and r.get("direction") == direction and "ms" in r]
        fused = [r for r in timed if r.get("method") == "triton"]
        if fused:
            best = min(fused, key=lambda r: r["ms"])
            missing = [k for k in keys if k not in best]
            if missing:
                raise SystemExit(f"--tuning {path}: its fastest {direction} MLP row lacks {', '.join(missing)}")
            out[direction] = tuple(int(best[k]) for k in keys)
            extra = (int(best.get("prefetch_h") or 0), int(best.get("persistent") or 0))
            if any(extra):  # the optional 7th and 8th values (PREFETCH_H, PERSISTENT)
                out[direction] += extra if extra[1] else extra[:1]
            plain = [r["ms"] for r in timed if r.get("method") == "torch"]
            if plain and min(plain) < best["ms"]:
                out[direction] = "torch"
    return out


def _csv(text, cast=str):
    return tuple(cast(x.strip()) for x in text.split(",") if x.strip()) if text else None


def _import(spec: str) -> None:
    """``--import``: a module by dotted name, or a ``.py`` file by path."""
    try:
        if spec.endswith(".py"):
            path = os.path.abspath(spec)
            # a name of its own, so that a file called e.g. json.py does not stand in for a real module
            name = "benchmarks_import_" + os.path.splitext(os.path.basename(path))[0]
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or not os.path.isfile(path):
                raise SystemExit(f"--import {spec}: no such file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except ImportError as e:
        raise SystemExit(f"--import {spec}: {e}") from None


def _writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write there ({e.strerror or e})") from None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # variants registered out of the tree (a module with @benchmarks.attention.variant functions)
    from benchmarks import attention  # the registry, before the user's modules use it
    for spec in args.imports:
        _import(spec)
    if args.list_variants:
        for v in attention.VARIANTS.values():
            doc = " ".join((v.fn.__doc__ or "").strip().split("\n\n")[0].split())
            print(f"{v.name}{' (reference)' if v.reference else ''}: {doc}")
        return 0
    if args.replot:
        path = os.path.join(args.replot, "results.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--replot {args.replot}: cannot read {path} ({getattr(e, 'strerror', None) or e})") from None
        path = attention.plot(harness.results_from_json(data), args.replot, data.get("environment", {}).get("device"))
        print(f"wrote {path}" if path else "no attention rows to plot")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks: --device cuda but CUDA is not available here; nothing run (skipped)")
        return 0
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    env = harness.environment(device)
    out = args.out or os.path.join(RESULTS_ROOT, harness.machine_slug(env))
    config = {"sections": ",".join(args.sections), "quick": args.quick}
    if args.time_budget:
        config["time budget s"] = args.time_budget
    if args.tuning:
        mlp_tiling = best_mlp_tiling(args.tuning)
        try:
            tiling = best_attention_tiling(args.tuning)
        except SystemExit:
            if not mlp_tiling:  # e.g. a sweep whose kernels all failed: measure with the defaults
                print(f"warning: --tuning: {args.tuning} has no timed attention or MLP rows; the default "
                      "tilings are used", flush=True)
                config["tuning"] = "none usable; default tilings"
            tiling = None
        if tiling:
            from audiomae.kernels import window_attention as wa

            wa.TUNING.clear()
            wa.TUNING.update(tiling)
            config["attention tiling"] = json.dumps(tiling, sort_keys=True)
            print(f"attention tiling from {args.tuning}: {config['attention tiling']}", flush=True)
        if mlp_tiling:
            from audiomae.kernels import gelu_mlp

            gelu_mlp.TUNING.clear()
            gelu_mlp.TUNING.update(mlp_tiling)
            config["MLP tiling"] = json.dumps(mlp_tiling, sort_keys=True)
            print(f"MLP tiling from {args.tuning}: {config['MLP tiling']}", flush=True)
    if args.op_backends:
        config["op backends (fused columns)"] = ", ".join(f"{k}={v}" for k, v in args.op_backends.items())
    _writable(out)
    report = harness.Report(out, env, config)
    kept = harness.keep_earlier_sections(report, args.sections)
    if kept:
        print(f"kept the earlier results of {', '.join(kept)} in {out} (not run now)", flush=True)
    budget = harness.Budget(args.time_budget if args.time_budget else 1e9)
    options = dict(batch=args.batch, model=args.model, no_compile=args.no_compile, plot_dir=out,
                   compile_mode=args.compile_mode, compile_options=args.compile_options,
                   attention_batches=args.attention_batches_list, attention_dtypes=_csv(args.attention_dtypes),
                   attention_variants=_csv(args.variants), fbank_batch=args.fbank_batch, step_batch=args.step_batch,
                   pretrain_columns=_csv(args.pretrain_columns), profile=args.profile,
                   op_backends=args.op_backends)
    ctx = harness.Context(device, args.quick, report, budget, options)
    print(f"benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}) -> {out}",
          flush=True)
    report.save()
    failed = []
    for i, name in enumerate(args.sections):
        share = SHARES[name] / sum(SHARES[s] for s in args.sections[i:])
        ctx.budget = harness.Budget(budget.left() * share)
        t0 = time.monotonic()
        load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"[{name}]" + (f" budget {ctx.budget.seconds:.0f} s" if args.time_budget else ""), flush=True)
        try:
            module = __import__(f"benchmarks.{name}", fromlist=["run"])
            module.run(ctx)
        except Exception as e:  # one broken section does not stop the others
            failed.append(name)
            report.note(name, f"section failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            traceback.print_exc()
            harness.free_memory(device)
        if device.type == "cpu" and hasattr(os, "getloadavg"):  # other work on the machine shows in the timings
            report.note(name, f"1-minute load average at the start / end of this section: {load0:.2f} / "
                              f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
        print(f"[{name}] done in {time.monotonic() - t0:.0f} s", flush=True)
    report.save()
    print(report.markdown())
    print(f"wrote {os.path.join(out, 'results.md')} and results.json", flush=True)
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
