"""A traced cost model of one training step (issue 19): `matta cost`.

trace.py traces ops on fake tensors; formulas.py gives each op's FLOPs, bytes and launches;
lowering.py makes the trace take a GPU's branches; step.py traces one `matta train` step;
cards.py holds the device cards; predict.py prices a trace on a card and prints the report.
Every number it prints is a prediction of a model, not a measurement.
"""
from .cards import CARDS, DeviceCard, card_for_cuda_device, load_card
from .step import StepTrace, trace_training_step
from .trace import HostRead, StepTracer, fake_device_tracing, new_fake_mode

__all__ = [
    "CARDS", "DeviceCard", "HostRead", "StepTrace", "StepTracer", "card_for_cuda_device",
    "fake_device_tracing", "load_card", "new_fake_mode", "trace_training_step",
]
