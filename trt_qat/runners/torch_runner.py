"""PyTorch runner: runs an ``nn.Module`` (FP32, fake-quantized or QAT) behind the common runner interface."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from trt_qat.errors import TrtQatError
from trt_qat.runners.base import BaseRunner

__all__ = ["TorchRunner"]


class TorchRunner(BaseRunner):
    """Runs a PyTorch module in eval mode under ``torch.no_grad()``; numpy in, numpy out.

    Args:
        model (torch.nn.Module): the model; it is put in eval mode when the runner is activated.
        input_name (str): name of the single input in feed dicts. Defaults to "images".
        output_names (sequence[str]): names given to the model's outputs, in order. Defaults to ("output",).
        device (str | torch.device | None): where to run. Defaults to the model's current device.
        name (str | None): the runner's name in reports. Defaults to "torch".
    """

    backend = "torch"

    def __init__(self, model: torch.nn.Module, input_name: str = "images", output_names=("output",),
                 device=None, name: str | None = None):
        super().__init__(name=name)
        if not isinstance(model, torch.nn.Module):
            raise TrtQatError(f"TorchRunner needs a torch.nn.Module, got {type(model).__name__}; "
                              "load the checkpoint into a model first")
        self.model = model
        self.input_name = input_name
        self.output_names = tuple(output_names)
        self.device = torch.device(device) if device is not None else None
        self._was_training = None

    def _model_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # --- BaseRunner hooks -----------------------------------------------------------------------
    def activate_impl(self):
        self._was_training = self.model.training
        if self.device is not None:
            self.model.to(self.device)
        self.model.eval()

    def deactivate_impl(self):
        if self._was_training:
            self.model.train()
        self._was_training = None

    def input_names_impl(self):
        return [self.input_name]

    def infer_impl(self, feed_dict):
        device = self._model_device()
        arr = np.asarray(feed_dict[self.input_name])
        self.model.eval()
        try:
            x = torch.from_numpy(arr).to(device)
            with torch.no_grad():
                out = self.model(x)
        except TrtQatError:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # a shape or dtype the model cannot take
            msg = " ".join(str(exc).split())[:300]
            raise TrtQatError(f"PyTorch inference of '{self.name}' failed on input '{self.input_name}' "
                              f"{list(arr.shape)} {arr.dtype} ({type(exc).__name__}: {msg}); give an input of the "
                              "shape and dtype the model takes") from None
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if len(outs) > len(self.output_names):
            names = list(self.output_names) + [f"output{i}" for i in range(len(self.output_names), len(outs))]
        else:
            names = list(self.output_names)
        return OrderedDict((n, t.detach().float().cpu().numpy()) for n, t in zip(names, outs))


def torch_runner_from_checkpoint(path, name: str | None = None, family: str | None = None):
    """A :class:`TorchRunner` for an FP32 (``trt-qat train``, or a model family's own ``.pt`` when ``family`` names
    it) or quantized (``calibrate``/``qat``) checkpoint.

    Returns:
        tuple[TorchRunner, str]: the runner and its precision label.
    """
    from trt_qat.models.adapter import adapter_for_model
    from trt_qat.quant.checkpoint import load_model
    from trt_qat.quant.instrument import check_amax

    model, _, quantized = load_model(path, family)
    if quantized:  # an uncalibrated quantizer would silently run in float (or give NaN)
        check_amax(model, stage="running it")
    adapter = adapter_for_model(model)  # (its ONNX names, so outputs pair up with an exported model's)
    runner = TorchRunner(model, input_name=adapter.input_names[0], output_names=adapter.output_names,
                         name=name or "torch")
    return runner, "int8 (fake-quant)" if quantized else "fp32"
