"""The device a command runs on, resolved once (`resolve`) and passed down as one object.

A `Device` is the string torch takes ('cpu', 'cuda:0'), so every function that times or builds on
a device takes it as is, and it carries what the suite says about that device: its name, the tag of
its results folder (results/<tag>/) and its software environment, each read once.
"""
from __future__ import annotations

from functools import cached_property

from reproduce import measure


class Device(str):
    """A resolved device ('cpu', 'cuda:N') with its name, results tag and environment."""

    @cached_property
    def name(self) -> str:
        """What the hardware calls itself (the CPU model, or the GPU's name)."""
        return measure.device_name(self)

    @cached_property
    def tag(self) -> str:
        """The results folder's name for this device (e.g. cpu-amd-epyc-2c)."""
        return measure.device_tag(self)

    @cached_property
    def env(self) -> dict:
        """What a throughput number needs beside it (measure.environment)."""
        return measure.environment(self)

    @property
    def is_cuda(self) -> bool:
        return self.startswith("cuda")


def resolve(value: "str | Device") -> Device:
    """The one device resolution: 'cpu' or 'cuda[:N]' checked against this machine (a
    measure.MeasureError naming the fix otherwise); a Device passes through as it is."""
    if isinstance(value, Device):
        return value
    return Device(measure.resolve_device(value))
