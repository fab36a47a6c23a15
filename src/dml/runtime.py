"""How a cohort computes, decided once: device, precision, memory format, denormal flushing,
BatchNorm folding for evaluation and the peer runner. Torch's global settings that it changes
are restored by ``close``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from .choices import DEVICES, PRECISIONS
from .errors import UserError
from .peer_threads import SerialPeers, ThreadedPeers, flushes_denormals, peer_runner
from .threads import fastest_thread_count


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in DEVICES and not name.startswith("cuda:"):
        raise UserError(f"device {name!r} is not one of: {', '.join(DEVICES)}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was requested but MPS is not available; use --device cpu")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, plain: bool = False) -> str:
    """auto: bf16 autocast on CPU (as the seed effectively ran) and on CUDA where supported;
    fp32 on the plain path."""
    if name not in PRECISIONS:
        raise UserError(f"precision {name!r} is not one of: {', '.join(PRECISIONS)}")
    if name == "auto" and plain:
        return "fp32"
    if name == "auto":
        if device.type == "cpu":
            return "bf16"
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on this device")
    return name


@dataclass
class Precision:
    """Autocast and loss scaling for one precision setting."""

    name: str
    device: torch.device

    def __post_init__(self):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


class Runtime:
    """Where and how one process's peers compute.

    ``plain`` keeps PyTorch's defaults (fp32 unless ``precision`` says otherwise, contiguous
    tensors, denormals kept, one thread for all peers, BatchNorm kept at evaluation); otherwise:
    - channels_last on CPU and CUDA (faster convolutions),
    - denormal floats flushed on CPU (fp32 training ran about 8x slower with them),
    - evaluation through copies with BatchNorm folded into the convolutions where a model offers
      ``folded()`` (about 10 % faster evaluation on CPU),
    - peers side by side on worker threads on CPU when ``side_by_side`` (4 to 11 % faster for 2
      and 4 x ResNet-32 on 2 cores),
    - ``threads`` intra-op threads per peer on CPU (None: measured, fewer than the cores where
      other programs keep them busy; see threads.py).
    """

    def __init__(
        self,
        device: str | torch.device = "auto",
        precision: str = "auto",
        plain: bool = False,
        num_peers: int = 1,
        side_by_side: bool = True,
        threads: int | None = None,
    ):
        self.device = resolve_device(device)
        self.precision = Precision(resolve_precision(precision, self.device, plain), self.device)
        self.plain = plain
        self.channels_last = self.device.type != "mps" and not plain
        self.fold_batchnorm = not plain
        self._restore_flush = flushes_denormals()
        if self.device.type == "cpu" and not plain:
            torch.set_flush_denormal(True)  # before the runner: its workers copy the setting
        if plain and threads is None:
            threads = torch.get_num_threads()  # PyTorch's own count, not measured
        self.runner: SerialPeers | ThreadedPeers = peer_runner(
            num_peers, self.device, side_by_side and not plain, threads
        )

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs on the device, in the memory format the models use."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            # the documented to(memory_format=...) form is missing from Module.to's overloads in torch's annotations
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model

    def inference_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in evaluation mode, or an evaluation copy with BatchNorm folded where it can be."""
        if self.fold_batchnorm and hasattr(model, "folded"):
            return cast("Callable[[], torch.nn.Module]", model.folded)()  # hasattr: it has one
        return model.eval()

    @property
    def threads(self) -> int:
        """Intra-op threads each peer computes with."""
        return self.runner.threads_per_worker

    def rethink_threads(self) -> int:
        """Measure the thread count again where it was measured at the start (between epochs: other
        programs may have started or ended since); returns the count now in force."""
        if self.runner.measured:
            self.runner.set_threads(fastest_thread_count(self.runner.share))
        return self.threads

    def use_threads(self, threads: int) -> None:
        """Compute with ``threads`` per peer (a resumed run's saved count) where it was to be measured."""
        if self.runner.measured:
            self.runner.set_threads(threads)

    def close(self) -> None:
        """Stop the peer threads and give torch back the settings it had before."""
        self.runner.close()
        self.runner = SerialPeers()
        torch.set_flush_denormal(self._restore_flush)
