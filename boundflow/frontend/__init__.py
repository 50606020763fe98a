"""Frontends: models from other frameworks into ``boundflow.ir.Graph``; VNN-LIB properties."""

from boundflow.frontend import vnnlib
from boundflow.frontend.onnx import from_onnx, load_onnx
from boundflow.frontend.pt2 import load_exported, load_model
from boundflow.frontend.torch import from_exported, from_torch
from boundflow.frontend.vnnlib import load_vnnlib, parse_vnnlib

__all__ = ["from_exported", "from_onnx", "from_torch", "load_exported", "load_model",
           "load_onnx", "load_vnnlib", "parse_vnnlib", "vnnlib"]
