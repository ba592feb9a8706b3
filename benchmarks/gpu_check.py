"""GPU energy check: the NVML energy counter against 10 Hz sampled power, under a matmul load.

Runs bf16 matmuls on ``cuda:0`` (after ``--warmup`` seconds of the same load) and, for
``--duration`` seconds, measures every visible GPU two ways at once with the ``nvml`` plugin:
one :class:`NvmlMeter` on the energy counter (``Method.COUNTER``) and one built with
``power_only=True`` (``Method.SAMPLED_POWER``, trapezoid-integrated power). Both are sampled
from one background thread at the same instants, like the engine's sampler. Prints both energies,
their ratio (target: within ``--tolerance``, 2 %), the sample timing, and the cost of one counter
read and one power read, idle and under load.

    python benchmarks/gpu_check.py [--duration 25] [--interval 0.1] [--size 8192]

Measured (H200, driver 580.159.04, nvidia-ml-py 13.610.43, 8192^3 bf16 at 662 TFLOP/s, ~691 W):
sampled/counter = 1.0006 over 25 s and 1.0003 over 45 s; 10 Hz sampling kept to +/-0.3 ms.
One counter read costs ~3 ms (median; p90 6-9 ms, max 33 ms), one power read ~1 us.

Exit status: 0 ratio within tolerance on the loaded GPU, 1 outside, 2 no GPU or nothing to
compare. No network. Needs torch with CUDA and nvidia-ml-py; green-mlops installed or run from
the repository root (pluggy is optional here).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import statistics
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _import_nvml_plugin() -> Any:
    """``green_mlops.plugins.nvml``, installed or from this checkout; pluggy may be absent."""
    try:
        import pluggy  # noqa: F401
    except ImportError:  # the plugin only needs the hookimpl marker: an identity decorator

        class _Marker:
            def __init__(self, project_name: str) -> None:
                self.project_name = project_name

            def __call__(self, function: Any = None, **_: Any) -> Any:
                return function if function is not None else (lambda f: f)

        shim = types.ModuleType("pluggy")
        shim.HookspecMarker = shim.HookimplMarker = _Marker  # type: ignore[attr-defined]
        sys.modules["pluggy"] = shim
        print("note: pluggy not installed; using a stand-in hookimpl marker")
    try:
        import green_mlops.plugins.nvml as plugin

        return plugin
    except ImportError:
        pass
    # Run from a checkout: green_mlops/ is importable from the root, plugins/ is mapped to
    # green_mlops.plugins by the package build; do that mapping by hand.
    sys.path.insert(0, str(ROOT))
    import green_mlops

    spec = importlib.util.spec_from_file_location(
        "green_mlops.plugins",
        ROOT / "plugins" / "__init__.py",
        submodule_search_locations=[str(ROOT / "plugins")],
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    setattr(green_mlops, "plugins", package)  # noqa: B010
    import green_mlops.plugins.nvml as plugin

    print(f"note: green-mlops loaded from the checkout {ROOT}")
    return plugin


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _stats_us(samples_ns: list[int]) -> str:
    us = sorted(x / 1000.0 for x in samples_ns)
    p90 = us[min(len(us) - 1, int(0.9 * len(us)))]
    return f"median {statistics.median(us):8.1f} us  p90 {p90:8.1f} us  max {us[-1]:8.1f} us"


def _read_costs(nvml: Any, handle: Any, n: int = 300) -> dict[str, str]:
    out: dict[str, str] = {}
    for label, fn in (
        (
            "counter read (nvmlDeviceGetTotalEnergyConsumption)",
            nvml.nvmlDeviceGetTotalEnergyConsumption,
        ),
        ("power read   (nvmlDeviceGetPowerUsage)", nvml.nvmlDeviceGetPowerUsage),
    ):
        times: list[int] = []
        try:
            for _ in range(n):
                t = time.perf_counter_ns()
                fn(handle)
                times.append(time.perf_counter_ns() - t)
            out[label] = _stats_us(times)
        except nvml.NVMLError as exc:
            out[label] = f"not supported ({exc})"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=25.0, help="measured seconds (>= 20)")
    parser.add_argument("--interval", type=float, default=0.1, help="sample interval, seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before")
    parser.add_argument("--size", type=int, default=8192, help="square matmul size")
    parser.add_argument("--tolerance", type=float, default=0.02, help="accepted |ratio - 1|")
    args = parser.parse_args(argv)
    if args.duration < 20:
        print(f"warning: --duration {args.duration} s is below the 20 s this check is meant for")

    try:
        import torch
    except ImportError:
        print("FAIL: torch is not installed")
        return 2
    if not torch.cuda.is_available():
        print("FAIL: no CUDA GPU visible to torch (torch.cuda.is_available() is False)")
        return 2
    plugin = _import_nvml_plugin()
    import pynvml

    counter_side = plugin.build_meters()
    power_side = plugin.build_meters(power_only=True)
    for item in counter_side + power_side:
        if not isinstance(item, plugin.NvmlMeter):
            print(f"unavailable: {item.describe()}")
    counter_meter = next((m for m in counter_side if isinstance(m, plugin.NvmlMeter)), None)
    power_meter = next((m for m in power_side if isinstance(m, plugin.NvmlMeter)), None)
    if counter_meter is None or power_meter is None:
        print("FAIL: the nvml plugin provides no meter here")
        return 2
    try:
        return _run(args, torch, pynvml, plugin, counter_meter, power_meter)
    finally:
        counter_meter.close()
        power_meter.close()


def _run(args: Any, torch: Any, nvml: Any, plugin: Any, cm: Any, pm: Any) -> int:
    props = torch.cuda.get_device_properties(0)
    torch_uuid = str(getattr(props, "uuid", "")).lower().removeprefix("gpu-")
    loaded = next(
        (g for g in cm.gpus if g.uuid.lower().removeprefix("gpu-") == torch_uuid and torch_uuid),
        None,
    )
    if loaded is None:
        loaded = cm.gpus[0]
        print(f"note: could not match cuda:0 by UUID ({torch_uuid!r}); assuming {loaded.device_id}")
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, nvidia-ml-py "
        f"{_version('nvidia-ml-py')}, driver {nvml.nvmlSystemGetDriverVersion()}"
    )
    for g in cm.gpus:
        mark = "  <- load (cuda:0)" if g is loaded else ""
        print(f"{g.device_id}: {g.label}; counter meter method: {g.method.value}{mark}")
    if loaded.method is not plugin.Method.COUNTER:
        print(f"FAIL: {loaded.device_id} has no energy counter: nothing to compare against")
        return 2
    print(
        f"meters: counter max_interval_s={cm.max_interval_s}, "
        f"power max_interval_s={pm.max_interval_s}; sampling every {args.interval} s"
    )

    print("\nread cost, idle:")
    for label, text in _read_costs(nvml, loaded.handle).items():
        print(f"  {label}: {text}")

    n = args.size
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()

    done = threading.Event()
    rows: list[tuple[float, Any, Any, int, int]] = []  # now, counter, power, ns per sample
    errors: list[str] = []

    def sampler() -> None:
        try:
            t0 = time.monotonic()
            cm.start(t0)
            pm.start(t0)
            k = 0
            while True:
                k += 1
                target = min(t0 + k * args.interval, t0 + args.duration)
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                now = time.monotonic()
                s0 = time.perf_counter_ns()
                rc = cm.sample(now)
                s1 = time.perf_counter_ns()
                rp = pm.sample(now)
                s2 = time.perf_counter_ns()
                rows.append((now - t0, rc, rp, s1 - s0, s2 - s1))
                if now >= t0 + args.duration:
                    break
        except BaseException as exc:  # reported by the main thread
            errors.append(repr(exc))
        finally:
            done.set()

    print(
        f"\nload: bf16 matmul {n}x{n} on cuda:0; warm-up {args.warmup} s, measure {args.duration} s"
    )
    flops = 2.0 * n**3
    iters = 0
    t_start = time.monotonic()
    thread: threading.Thread | None = None
    t_measure, iters_at_measure = 0.0, 0
    while not done.is_set():
        for _ in range(10):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()  # bounds the launch queue; releases the GIL while waiting
        iters += 10
        if thread is None and time.monotonic() - t_start >= args.warmup:
            thread = threading.Thread(target=sampler, name="gpu-check-sampler", daemon=True)
            t_measure, iters_at_measure = time.monotonic(), iters
            thread.start()
    t_end = time.monotonic()
    tflops = flops * (iters - iters_at_measure) / (t_end - t_measure) / 1e12

    print("read cost, under load:")
    load_costs: dict[str, str] = {}
    stop_load = threading.Event()

    def keep_loading() -> None:
        torch.cuda.set_device(0)  # a new thread has no current CUDA context for cuBLAS
        while not stop_load.is_set():
            for _ in range(10):
                torch.matmul(a, b, out=c)
            torch.cuda.synchronize()

    loader = threading.Thread(target=keep_loading, daemon=True)
    loader.start()
    try:
        load_costs = _read_costs(nvml, loaded.handle)
    finally:
        stop_load.set()
        loader.join()
    for label, text in load_costs.items():
        print(f"  {label}: {text}")
    if errors:
        print(f"FAIL: sampler thread raised {errors[0]}")
        return 2

    print(f"\nmatmul throughput during the window: {tflops:.0f} TFLOP/s")
    times = [r[0] for r in rows]
    gaps = [t1 - t0 for t0, t1 in zip([0.0, *times], times, strict=False)]
    late = sum(1 for g in gaps if g > 1.5 * args.interval)
    ms = [g * 1e3 for g in gaps]
    print(
        f"samples: {len(rows)} over {times[-1]:.2f} s; interval mean {statistics.mean(ms):.1f} ms, "
        f"median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms, "
        f"stdev {statistics.pstdev(ms):.1f} ms; longer than 1.5x interval: {late}"
    )
    print(f"sample() cost: counter meter {_stats_us([r[3] for r in rows])}")
    print(f"               power meter   {_stats_us([r[4] for r in rows])}")
    bad = [
        (r[0], dev, v)
        for r in rows
        for d in (r[1], r[2])
        for dev, v in d.items()
        if isinstance(v, plugin.DeviceError)
    ]
    if bad:
        print(f"device errors during the window: {len(bad)}, first: {bad[0]}")
    if pm.gaps:
        print(f"power-meter gaps (energy not counted): {pm.gaps}")

    duration = times[-1]
    final_c, final_p = rows[-1][1], rows[-1][2]
    verdict = 2
    print(f"\nenergy over the window (J), counter vs sampled power at {1 / args.interval:.0f} Hz:")
    for g in cm.gpus:
        ec, ep = final_c.get(g.device_id), final_p.get(g.device_id)
        if not isinstance(ec, float) or not isinstance(ep, float) or ec <= 0:
            print(f"  {g.device_id}: counter {ec!r}, sampled {ep!r}: no comparison")
            continue
        ratio = ep / ec
        within = abs(ratio - 1.0) <= args.tolerance
        mark = ""
        if g is loaded:
            verdict = 0 if within else 1
            mark = "  PASS" if within else f"  FAIL (outside +/-{args.tolerance:.0%})"
        print(
            f"  {g.device_id}: counter {ec:10.1f} J ({ec / duration:6.1f} W avg)   "
            f"sampled {ep:10.1f} J ({ep / duration:6.1f} W avg)   "
            f"sampled/counter {ratio:.4f} ({(ratio - 1) * 100:+.2f} %){mark}"
        )
    return verdict


if __name__ == "__main__":
    sys.exit(main())
