"""FLOPs of a model step, counted on a copy of the module (never the real one, never its RNG).

torch is imported inside the functions: importing this module costs nothing. The dense peaks
for MFU are in :mod:`green_mlops.flops_peaks`. See docs/flops.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from green_mlops.units import clip

if TYPE_CHECKING:
    import torch

__all__ = [
    "FlopCount",
    "FlopCountError",
    "LiveCount",
    "count_flops",
    "default_loss",
    "signature",
]

#: Largest module (parameters + buffers, bytes) copied to the CPU to count FLOPs with the real
#: batch when the meta device fails and the module does not already live on the CPU.
CPU_COPY_MAX_BYTES = 256 * 2**20


# --- counting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one step, and how they were counted."""

    flops: int
    #: ``live`` (the real step, counted as it ran), ``meta`` (a meta-device copy) or
    #: ``cpu-copy`` (a CPU copy run on the real batch).
    method: str
    #: Custom (non-aten) ops that ran during the step: their FLOPs are not in :attr:`flops`.
    uncounted_ops: tuple[str, ...] = ()
    #: Why the meta device could not be used, when ``method`` is ``cpu-copy``.
    meta_problem: str = ""


class FlopCountError(Exception):
    """The step's FLOPs could not be counted; the message says why (and what to do)."""


#: Namespaces of ops that are not compute (communication, profiling, primitives).
_NOT_COMPUTE = frozenset({"aten", "prim", "prims", "profiler", "c10d", "_c10d_functional"})

_tensor_type: Any = None


def signature(batch: Any) -> Hashable:
    """A hashable key of a batch's structure: tensors by shape and dtype, containers by
    content, anything else by type. Two batches with equal signatures cost the same FLOPs."""
    global _tensor_type
    if _tensor_type is None:
        import torch

        _tensor_type = torch.Tensor
    if isinstance(batch, _tensor_type):
        return (tuple(batch.shape), batch.dtype)
    if isinstance(batch, (list, tuple)):
        return (type(batch), *(signature(item) for item in batch))
    if isinstance(batch, Mapping):
        return (type(batch), *((key, signature(value)) for key, value in batch.items()))
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return (
            type(batch),
            *((f.name, signature(getattr(batch, f.name))) for f in dataclasses.fields(batch)),
        )
    return (type(batch),)


def default_loss(output: Any) -> torch.Tensor | None:
    """The loss of a step's output, as Lightning reads it: the output itself if it is a tensor,
    ``output["loss"]`` for a mapping; ``None`` (no backward) otherwise."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]  # type: ignore[no-any-return]
    return None


def count_flops(
    module: torch.nn.Module,
    step: Callable[[Any, Any], Any],
    batch: Any,
    *,
    backward: bool,
    loss: Callable[[Any], torch.Tensor | None] = default_loss,
    cpu_copy_max_bytes: int = CPU_COPY_MAX_BYTES,
) -> FlopCount:
    """FLOPs of ``step(copy_of_module, batch)`` (and of the loss's backward if ``backward``).

    The module and batch are copied (meta device first, then CPU; see docs/flops.md);
    evaluation steps (``backward=False``) run under ``torch.no_grad``. A step whose output has
    no loss (``loss(output) is None``, e.g. Lightning's "skip this batch") counts its forward
    only. Warnings raised by the step on the copy (e.g. ``self.log`` without a trainer) are
    suppressed.

    Raises:
        FlopCountError: neither copy could run the step; the message gives both reasons.
    """
    try:
        flops, uncounted = _run_counted(module, step, batch, "meta", backward=backward, loss=loss)
        return FlopCount(flops, "meta", uncounted)
    except Exception as exc:
        meta_problem = _describe(exc)
    size = _module_bytes(module)
    on_cpu = all(t.device.type == "cpu" for t in _tensors(module))
    if not on_cpu and size > cpu_copy_max_bytes:
        raise FlopCountError(
            f"the step cannot run on the meta device ({meta_problem}), and the module "
            f"({size / 2**20:.0f} MiB) is too large to copy to the CPU: set "
            "`flops_per_batch` on the module"
        )
    import torch

    try:
        with torch.random.fork_rng(devices=[]):
            flops, uncounted = _run_counted(
                module, step, batch, "cpu", backward=backward, loss=loss
            )
    except Exception as exc:
        raise FlopCountError(
            f"the step cannot run on a meta-device copy ({meta_problem}) nor on a CPU copy "
            f"({_describe(exc)}): set `flops_per_batch` on the module"
        ) from None
    return FlopCount(flops, "cpu-copy", uncounted, meta_problem)


class LiveCount:
    """Counts the FLOPs of the real work done in this thread from construction to :meth:`stop`.

    No copy and no extra step: the step that runs anyway is counted as it runs (forward,
    backward and optimizer; elementwise ops count 0). Counting slows that one step down: about
    0.6 of a step for a small MLP on a CPU, less for larger kernels. Always call :meth:`stop`
    (also on an exception), or the counting mode stays active.
    """

    def __init__(self) -> None:
        self._counter = _Counter(display=False)
        self._counter.__enter__()
        self._active = True

    def stop(self) -> FlopCount:
        if self._active:
            self._active = False
            self._counter.__exit__(None, None, None)
        uncounted = tuple(sorted(self._counter.uncounted))
        return FlopCount(int(self._counter.get_total_flops()), "live", uncounted)


def _run_counted(
    module: torch.nn.Module,
    step: Callable[[Any, Any], Any],
    batch: Any,
    device: str,
    *,
    backward: bool,
    loss: Callable[[Any], torch.Tensor | None],
) -> tuple[int, tuple[str, ...]]:
    import torch

    clone = _copy_module(module, device)
    moved = _move(batch, device)
    counter = _Counter(display=False)
    with warnings.catch_warnings(), counter:
        warnings.simplefilter("ignore")
        if backward:
            output = step(clone, moved)
            value = loss(output)
            if value is not None and value.requires_grad:
                (value.sum() if value.ndim else value).backward()  # type: ignore[no-untyped-call]
        else:
            with torch.no_grad():
                step(clone, moved)
    return int(counter.get_total_flops()), tuple(sorted(counter.uncounted))


def _counter_class() -> type:
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(FlopCounterMode):
        """FlopCounterMode that also notes the custom ops it could not count."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.uncounted: set[str] = set()

        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if func_packet not in self.flop_registry:
                name = str(func_packet)
                if name.split(".", 1)[0] not in _NOT_COMPUTE:
                    self.uncounted.add(name)
            return super()._count_flops(func_packet, out, args, kwargs)  # type: ignore[no-untyped-call]

    return Counter


def _Counter(**kwargs: Any) -> Any:
    global _counter_cls
    if _counter_cls is None:
        _counter_cls = _counter_class()
    return _counter_cls(**kwargs)


_counter_cls: type | None = None


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _module_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in _tensors(module):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _copy_module(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """A deep copy whose parameters and buffers are new tensors on ``device``.

    The memo makes ``deepcopy`` use those tensors instead of copying the real ones, so a meta
    copy allocates nothing and a CPU copy copies each tensor once, straight to the CPU.
    Lightning modules drop their trainer reference when copied (``__getstate__``).
    """
    import torch

    memo: dict[int, Any] = {}
    for p in module.parameters():
        if id(p) not in memo:
            data = _to(p.detach(), device)
            memo[id(p)] = torch.nn.Parameter(data, requires_grad=p.requires_grad)
    for b in module.buffers():
        if id(b) not in memo:
            memo[id(b)] = _to(b.detach(), device)
    clone = copy.deepcopy(module, memo)
    return clone


def _to(t: torch.Tensor, device: str) -> torch.Tensor:
    import torch

    if device == "meta":
        return torch.empty_like(t, device="meta")
    return t.to(device, copy=True)


def _move(batch: Any, device: str) -> Any:
    """The batch on ``device``: tensors copied (the step may modify them in place), containers
    rebuilt, anything else shared."""
    import torch

    if isinstance(batch, torch.Tensor):
        moved = _to(batch.detach(), device)
        return moved.requires_grad_() if batch.requires_grad else moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_move(item, device) for item in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(item, device) for item in batch)
    if isinstance(batch, Mapping):
        with contextlib.suppress(Exception):
            return type(batch)({key: _move(value, device) for key, value in batch.items()})  # type: ignore[call-arg]
        return {key: _move(value, device) for key, value in batch.items()}
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: _move(getattr(batch, f.name), device) for f in dataclasses.fields(batch)}
        with contextlib.suppress(Exception):
            return dataclasses.replace(batch, **changes)
    return batch


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = clip(text, 200)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
