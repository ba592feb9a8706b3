"""The hooks a green-mlops plugin can implement.

Functions named like the specs below, decorated with :data:`hookimpl`, in a module advertised
through the ``green_mlops`` entry-point group (the built-ins are registered by module, and are
no more privileged). Any plugin can be switched off with ``GREEN_MLOPS_DISABLE_PLUGINS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from green_mlops.config import Settings
    from green_mlops.intensity import IntensityProvider
    from green_mlops.meters import Meter, MeterUnavailable
    from green_mlops.references import EnergyReference

PROJECT_NAME = "green_mlops"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def green_mlops_meters(settings: Settings) -> Sequence[Meter | MeterUnavailable] | None:
    """Return the energy meters this plugin can provide on this machine.

    Called once each time a :class:`~green_mlops.tracker.Tracker` starts, in the thread that
    starts it, and by ``green-mlops doctor``. Keep it fast (it delays the start): open handles,
    do not measure.

    Return :class:`~green_mlops.meters.Meter` instances for what can be measured, and a
    :class:`~green_mlops.meters.MeterUnavailable` for what the plugin would measure but cannot
    here (no driver, permission denied, unsupported counter), with the fix. Return ``None`` or
    an empty list when the plugin has nothing to say about this machine.

    The engine keeps, for each component (GPU, CPU, RAM), the meters with the best method
    (counter over sampled power over estimate); the others are reported as superseded.
    """


@hookspec
def green_mlops_intensity_providers(settings: Settings) -> Sequence[IntensityProvider] | None:
    """Return the carbon-intensity providers this plugin offers.

    Called once per accountant (each tracked run), in the thread that starts it; keep it cheap:
    no network here. Each provider has a unique ``name``; ``GREEN_MLOPS_INTENSITY_PROVIDERS``
    picks which are used and in which order (the first that covers a piece of time prices it).
    A provider that needs a token it does not have still returns itself and says so from
    :meth:`~green_mlops.intensity.IntensityProvider.configured`, so provenance can tell why it
    was skipped.
    """


@hookspec
def green_mlops_energy_references(
    settings: Settings,
) -> Sequence[EnergyReference | MeterUnavailable] | None:
    """Return whole-job energy figures kept outside the process (a resource manager's
    accounting, a PDU) that this plugin can read here.

    Called once per measured run, and only in the process that reports the job's totals
    (global rank 0). Each :class:`~green_mlops.references.EnergyReference` is read at the run's
    start and end; the difference is logged as ``green/reference/<name>/energy_kwh`` beside
    the measured total, never added to it (it overlaps the component meters). Return a
    :class:`~green_mlops.meters.MeterUnavailable` for a figure that exists on this kind of
    system but cannot be read here, with the fix (``quiet`` when its absence is normal).
    """
