"""Published figures about the data centre and the hardware: fleet PUE and embodied emissions.

Plain tables, read by the settings (``GREEN_MLOPS_PUE=aws``) and by the footprint (SCI's M).
Each figure cites its publisher; see docs/carbon-accounting.md.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLOUD_PUE", "KNOWN_EMBODIED", "EmbodiedFigure", "PueFigure"]


@dataclass(frozen=True)
class PueFigure:
    """A data-centre fleet's published power usage effectiveness."""

    value: float
    source: str
    #: Year the figure describes (not the year it was published).
    year: int


#: Fleet-wide PUE published by the cloud providers themselves (opt-in: GREEN_MLOPS_PUE=gcp).
#: A fleet average, not the PUE of the region a job runs in. Microsoft Azure is absent: its
#: fleet figure could not be verified from a Microsoft publication (only from press reports).
CLOUD_PUE: dict[str, PueFigure] = {
    "aws": PueFigure(
        1.14,
        "Amazon Sustainability, 'AWS Cloud' page: 'In 2025, our data centers reported an "
        "average global PUE of 1.14' (1.15 in 2024); "
        "https://sustainability.aboutamazon.com/environment/the-cloud/asdi (as retrieved)",
        2025,
    ),
    "gcp": PueFigure(
        1.10,
        "Google, 'Our 2024 Environmental Report': 'In 2023, the average annual power usage "
        "effectiveness for our data centers was 1.10'; "
        "https://blog.google/outreach-initiatives/sustainability/2024-environmental-report",
        2023,
    ),
}


@dataclass(frozen=True)
class EmbodiedFigure:
    """Embodied (cradle-to-gate) emissions of one device, from a manufacturer's footprint."""

    kgco2e: float
    source: str
    #: What the figure covers and what it leaves out.
    scope: str


#: Known devices by model name, as NVML reports it (the device label before `` (``).
#: Only figures a manufacturer published; everything else needs GREEN_MLOPS_EMBODIED_KGCO2E.
KNOWN_EMBODIED: dict[str, EmbodiedFigure] = {
    # H100 SXM5 80GB: the GPU of the HGX H100 8-GPU baseboard.
    "NVIDIA H100 80GB HBM3": EmbodiedFigure(
        1312.0 / 8,
        "NVIDIA, 'HGX H100 PCF Summary': cradle-to-gate carbon footprint of one HGX H100 "
        "baseboard (8 GPUs) 1,312 kgCO2e, divided by 8; "
        "https://images.nvidia.com/aem-dam/Solutions/documents/HGX-H100-PCF-Summary.pdf",
        "GPU share of the baseboard only; host server (CPUs, memory, storage, chassis) "
        "not included",
    ),
}
