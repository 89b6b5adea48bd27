"""The machine a report or a generated docs page was measured on, in one line."""
from __future__ import annotations

import os
import platform


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {device}; Python {platform.python_version()}, torch {torch.__version__}")
