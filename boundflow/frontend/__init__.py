"""Frontends: models from other frameworks into ``boundflow.ir.Graph``."""

from boundflow.frontend.torch import from_exported, from_torch, load_exported, load_model

__all__ = ["from_exported", "from_torch", "load_exported", "load_model"]
