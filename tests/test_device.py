"""The one device resolution (reproduce/device.py): resolved once, passed down as one object."""
import pytest

from reproduce import errors, measure, runner
from reproduce.device import Device, resolve
from reproduce.registry import load_table


def test_a_device_is_resolved_once_and_passes_through(monkeypatch):
    device = resolve("cpu")
    assert isinstance(device, Device) and device == "cpu" and not device.is_cuda
    assert device.tag == measure.device_tag("cpu") and device.name == measure.device_name("cpu")
    assert resolve(device) is device and errors.device(device) is device
    reads = []
    plain = measure.environment
    monkeypatch.setattr(measure, "environment", lambda d: reads.append(d) or plain(d))
    spec = load_table("riformer-8")
    first = runner.TableRun(spec, device, kinds=set(), show_progress=False)
    second = runner.TableRun(spec, device, kinds=set(), show_progress=False)
    assert first.device is second.device is device and len(reads) == 1  # the environment read once
    assert first.meta()["device tag"] == device.tag


def test_a_bad_device_is_one_line():
    with pytest.raises(measure.MeasureError, match="unknown device 'tpu'"):
        resolve("tpu")
    with pytest.raises(errors.SuiteError, match="unknown device 'tpu'; use cpu or cuda"):
        errors.device("tpu")
