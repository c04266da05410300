"""Files that run code when a careless loader reads them, for the loaders' tests: each leaves a
file behind at `path` if its code runs, so a test asserts that the file never appears."""
import os
import warnings
from typing import Tuple

import torch
import torch.nn as nn


class Planted:
    """Unpickled, it calls os.system("touch path") (call="system") or open(path, "w") ("open"):
    a stand-in for any code a pickle can run. torch.save it inside a checkpoint."""

    def __init__(self, path, call="system"):
        self.path, self.call = str(path), call

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",)) if self.call == "system" else (open, (self.path, "w"))


class PlantedModule(nn.Module):
    """A TorchScript module whose __setstate__, which torch.jit.load runs, creates `path`
    (torch.from_file maps a file shared, creating it): TorchScript archives carry code too."""

    def __init__(self, path):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.path = str(path)

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return self.w, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        written = torch.from_file(state[1], True, 1, dtype=torch.uint8).fill_(1)
        self.w = state[0] + 0 * written.sum()  # used, so that TorchScript keeps the write
        self.path = state[1]
        self.training = state[2]


def write_planted_module(path, target):
    """PlantedModule(target) saved as a TorchScript archive at path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, and is how such files are made
        torch.jit.save(torch.jit.script(PlantedModule(target)), str(path))
    return str(path)
