"""A check for code that must run on any device, usable where no GPU is."""

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import starquant_plugin

PACKAGE = str(Path(starquant_plugin.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
FACTORIES = {torch.zeros, torch.ones, torch.eye, torch.full, torch.empty, torch.rand,
             torch.randn, torch.randint, torch.randperm, torch.arange, torch.tensor,
             torch.linspace}


class DevicelessTensors(TorchFunctionMode):
    """Records where the package creates a tensor without naming its device.

    A GPU cannot be tested here, but this is how calibration and evaluation break on one: a
    tensor made on the default device (the CPU) meets the model's CUDA tensors. Every factory
    call in the package states ``device=`` (``"cpu"`` for seeded draws that are then moved,
    so every device gets the same numbers)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(TORCH):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = frame.f_code.co_filename[len(PACKAGE) + 1:]
                self.found.add(f"{where}:{frame.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)
