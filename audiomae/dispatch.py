"""Backend dispatch for the fused ops: one place that decides which implementation runs.

Backends: ``torch`` (the plain PyTorch references, always available), ``triton`` (Triton kernels; on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``), ``cuda`` (the compiled extension in
``csrc/``). Each implementation declares why it cannot run on given inputs (a list of reasons, empty
when it can), and may declare inputs on which the automatic choice passes over it although it can
run them (where it was measured slower than the next backend). The automatic choice takes the first
backend of the op's preference order that can run the inputs and is not passed over, and logs the
others' reasons at debug level; a backend the user forced raises its reasons as the error (forced
for every op, it applies to the ops that have an implementation on it). A backend
that needs a one-time step (the CUDA extension's just-in-time build) takes it when the automatic
choice first picks it; if that fails, a warning says why and the next backend runs.

Force a backend with the environment variable ``AUDIOMAE_BACKEND=torch|triton|cuda`` or in Python::

    audiomae.dispatch.set_backend("torch")              # every op
    audiomae.dispatch.set_backend("triton", op="window_attention")
    with audiomae.dispatch.use_backend("torch"): ...    # temporarily
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger("audiomae.dispatch")

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "AUDIOMAE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for and cannot run these inputs; the message lists why (also as ``op``,
    ``backend`` and ``reasons``)."""

    def __init__(self, message: str, op: Optional[str] = None, backend: Optional[str] = None,
                 reasons: Sequence[str] = ()):
        super().__init__(message)
        self.op, self.backend, self.reasons = op, backend, list(reasons)


@dataclass
class Implementation:
    fn: Callable
    why_not: Callable[..., List[str]]  # same arguments as fn -> reasons it cannot run (empty: it can)
    # same arguments -> reasons the automatic choice passes over it although it can run (measured
    # slower on these inputs); a forced backend ignores them
    passed_over: Callable[..., List[str]] = None  # type: ignore[assignment]
    # run each time before the automatic choice takes it (e.g. a just-in-time build; cheap once
    # done); an exception makes the choice fall through to the next backend with a warning
    prepare: Optional[Callable[[], object]] = None


_REGISTRY: Dict[str, Dict[str, Implementation]] = {}
_PREFERENCE: Dict[str, Tuple[str, ...]] = {}
_FORCED: Dict[Optional[str], Optional[str]] = {}  # op name (None: every op) -> backend


def _always(*args, **kwargs) -> List[str]:
    return []


def register(op: str, backend: str, fn: Callable, why_not: Optional[Callable[..., List[str]]] = None,
             passed_over: Optional[Callable[..., List[str]]] = None,
             prepare: Optional[Callable[[], object]] = None) -> None:
    """Declare ``fn`` as ``op``'s implementation on ``backend``; ``why_not`` tells when it cannot run,
    ``passed_over`` when the automatic choice should take a later backend although this one can run
    (it is slower there), and ``prepare`` (e.g. a build, cheap once done) runs before the automatic
    choice takes it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = Implementation(fn, why_not or _always, passed_over or _always, prepare)


def set_preference(op: str, order: Sequence[str]) -> None:
    """Automatic choice order for ``op`` (the fastest first); ``torch`` is always the last resort."""
    order = tuple(b for b in order if b != "torch") + ("torch",)
    _PREFERENCE[op] = order


def preference(op: str) -> Tuple[str, ...]:
    """The automatic choice order of ``op``."""
    return _PREFERENCE.get(op, ("triton", "torch"))


def _check_name(backend: Optional[str]) -> Optional[str]:
    if backend is None or backend in ("", "auto"):
        return None
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a name, one of {', '.join(BACKENDS)} or 'auto' (or None), "
                         f"got {backend!r} ({type(backend).__name__})")
    backend = backend.lower()
    if backend == "auto":
        return None
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return backend


# modules whose import registers op implementations (imported on demand to check an op name)
_OP_MODULES = ("ops", "ops_step", "ops_cuda")


def _check_op(op: Optional[str]) -> Optional[str]:
    """``op`` if it is None (every op) or a registered op name, else a ValueError naming the ops. The
    op modules register on import, so they are imported before an unknown name is refused."""
    if op is None:
        return None
    if not isinstance(op, str):
        raise ValueError(f"op must be an op name (or None for every op), got {op!r} ({type(op).__name__})")
    problems = []
    if op not in _REGISTRY:
        import importlib

        for name in _OP_MODULES:
            try:
                importlib.import_module(f"{__package__}.{name}")
            except Exception as e:  # a broken optional module: say so rather than hide it
                problems.append(f"audiomae.{name} is not importable ({type(e).__name__}: {e})")
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; the ops are {', '.join(registered_ops())}"
                         + ("; " + "; ".join(problems) if problems else ""))
    return op


def set_backend(backend: Optional[str], op: Optional[str] = None) -> None:
    """Force ``backend`` for ``op`` (or for every op when ``op`` is None); ``None``/'auto' restores the
    automatic choice. Takes precedence over ``AUDIOMAE_BACKEND``; a per-op setting (also 'auto') takes
    precedence over the one for every op. Unknown backends and ops raise ValueError."""
    backend = _check_name(backend)
    _FORCED[_check_op(op)] = backend


@contextlib.contextmanager
def use_backend(backend: Optional[str], op: Optional[str] = None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`."""
    had, before = op in _FORCED, _FORCED.get(op)
    set_backend(backend, op)
    try:
        yield
    finally:
        if had:
            _FORCED[op] = before
        else:
            _FORCED.pop(op, None)


def forced_backend(op: str) -> Optional[str]:
    """The backend forced for ``op`` (per-op setting, then global setting, then the environment); a
    setting of None/'auto' means the automatic choice, whatever comes after it."""
    return _forced(op)[0]


def _forced(op: str) -> Tuple[Optional[str], str]:
    """(forced backend or None, where that is set: ``"op"``, ``"every op"`` or ``"environment"``). A
    backend forced for every op (or by the environment) applies to the ops that have an implementation
    on it; the others keep the automatic choice."""
    if op in _FORCED:
        return _FORCED[op], "op"
    if None in _FORCED:
        backend, source = _FORCED[None], "every op"
    else:
        raw = os.environ.get(ENV_VAR)
        try:
            backend, source = _check_name(raw.strip() if isinstance(raw, str) else raw), "environment"
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}={raw!r}: {e}") from None
    if backend is not None and op in _REGISTRY and backend not in _REGISTRY[op]:
        return None, source
    return backend, source


def _undo_advice(op: str, source: str) -> str:
    """How to get the automatic choice back, for a backend forced at ``source`` (see :func:`_forced`)."""
    if source == "environment":
        return f"Unset {ENV_VAR} or call audiomae.dispatch.set_backend(None) for the automatic choice."
    if source == "every op":
        return (f"Call audiomae.dispatch.set_backend(None) for the automatic choice (it takes precedence over "
                f"{ENV_VAR}).")
    return f"Call audiomae.dispatch.set_backend(None, op={op!r}) for the automatic choice of this op."


def reasons(op: str, *args, **kwargs) -> Dict[str, List[str]]:
    """For every backend, why it cannot run ``op`` on these inputs (empty list: it can)."""
    impls = _REGISTRY.get(op, {})
    out = {}
    for b in BACKENDS:
        if b not in impls:
            out[b] = [f"no {b} implementation of {op}"]
        else:
            try:
                out[b] = list(impls[b].why_not(*args, **kwargs))
            except Exception as e:  # a check must never break the op
                out[b] = [f"support check failed: {type(e).__name__}: {e}"]
    return out


def passed_over(op: str, *args, **kwargs) -> Dict[str, List[str]]:
    """For every registered backend, why the automatic choice passes over it on these inputs although
    it may run them (empty list: it does not)."""
    out = {}
    for b, impl in _REGISTRY.get(op, {}).items():
        try:
            out[b] = list(impl.passed_over(*args, **kwargs))
        except Exception as e:  # a check must never break the op
            out[b] = [f"check failed: {type(e).__name__}: {e}"]
    return out


def would_choose(op: str, *args, **kwargs) -> str:
    """The backend :func:`choose` takes for these inputs, without running any one-time step (a build)
    it would run first; that step may still fail and make :func:`choose` take the next backend."""
    return _choose(op, args, kwargs, prepare=False)[0]


def choose(op: str, *args, **kwargs) -> Tuple[str, Callable]:
    """The backend name and function that will run ``op`` on these inputs."""
    return _choose(op, args, kwargs, prepare=True)


def _why_not(impl, args, kwargs) -> List[str]:
    """A backend's reasons not to run; a check that fails on odd inputs is a reason too (the next
    backend, the reference last, then meets the inputs and says what is wrong with them)."""
    try:
        return list(impl.why_not(*args, **kwargs))
    except Exception as e:
        return [f"support check failed: {type(e).__name__}: {e}"]


def _choose(op: str, args, kwargs, prepare: bool) -> Tuple[str, Callable]:
    impls = _REGISTRY.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    forced, source = _forced(op)
    if forced is not None:
        impl = impls.get(forced)
        why = [f"no {forced} implementation of {op}"] if impl is None else _why_not(impl, args, kwargs)
        if why:
            raise BackendUnavailableError(f"{op}: backend '{forced}' was asked for but cannot run: " + "; ".join(why)
                                          + ". " + _undo_advice(op, source), op=op, backend=forced, reasons=why)
        return forced, impl.fn
    for b in preference(op):
        impl = impls.get(b)
        if impl is None:
            continue
        why = _why_not(impl, args, kwargs) or impl.passed_over(*args, **kwargs)
        if not why and prepare and impl.prepare is not None and not _compiling():
            try:
                impl.prepare()
            except Exception as e:  # e.g. a failed build: the next backend runs, with the reason shown once
                why = [f"{type(e).__name__}: {e}"]
                warnings.warn(f"audiomae: {op}: the {b} backend is not used: {e}", RuntimeWarning, stacklevel=3)
        if not why:
            return b, impl.fn
        if not _compiling():  # logging inside a torch.compile'd region would break its graph
            log.debug("%s: %s not used: %s", op, b, "; ".join(why))
    raise BackendUnavailableError(f"{op}: no backend can run these inputs")


def _compiling() -> bool:
    """Whether torch.compile is tracing (``torch.compiler.is_compiling`` from torch 2.3, the
    dynamo-level check before)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if check is None:
        from torch import _dynamo

        check = _dynamo.is_compiling
    return bool(check())


def call(op: str, *args, **kwargs):
    """Run ``op`` with the chosen backend."""
    return choose(op, *args, **kwargs)[1](*args, **kwargs)


def registered_ops() -> List[str]:
    return sorted(_REGISTRY)


def device_reasons(backend: str, device: Union[str, torch.device]) -> List[str]:
    """Why ``backend`` can run no op on tensors on ``device`` (empty: its ops may run there, as their
    inputs allow)."""
    device = torch.device(device)
    backend = _check_name(backend)
    if backend == "triton":
        return _triton_reasons([device])
    if backend == "cuda":
        from . import cuda_ext

        out = list(cuda_ext.why_not())
        if device.type != "cuda":
            out.append(f"the device is {device} (the CUDA kernels need CUDA tensors)")
        return out
    return []


def check_device(device: Union[str, torch.device]) -> None:
    """Raise :class:`BackendUnavailableError` when a forced backend can run none of its ops on
    ``device``: a run on that device stops before it starts rather than at its first op."""
    for op in _all_ops():
        forced, source = _forced(op)
        if forced is None:
            continue
        why = device_reasons(forced, device)
        if why:
            raise BackendUnavailableError(f"backend '{forced}' was asked for but cannot run on {device}: "
                                          + "; ".join(why) + ". " + _undo_advice(op, source),
                                          backend=forced, reasons=why)


def _all_ops() -> List[str]:
    """Every op name, the op modules imported first (their import registers the ops)."""
    import importlib

    for name in _OP_MODULES:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except Exception:  # a broken optional module: its ops are not there to check
            pass
    return registered_ops()


# --- availability helpers shared by the backends ------------------------------------------------
def triton_reasons(*tensors) -> List[str]:
    """Why Triton kernels cannot run on these tensors: triton missing, or CPU tensors without the
    interpreter (``TRITON_INTERPRET=1``), or tensors on another device type."""
    return _triton_reasons([t.device for t in tensors if t is not None])


def _triton_reasons(devices: Sequence[torch.device]) -> List[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return [f"triton is not importable ({type(e).__name__}: {e})"]
    # as Triton reads it (1, true, yes, on, y), without touching triton.knobs (torch.compile skips it)
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")
    for d in devices:
        if d.type == "cpu" and not interpret:
            return ["tensors are on the CPU (Triton runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"]
        if d.type not in ("cpu", "cuda"):
            return [f"tensors are on {d.type}, Triton kernels need CUDA"]
    return []
