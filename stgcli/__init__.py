"""stg: spatio-temporal video grounding with SpaceVLLM.

    >>> from stgcli import load_model, ground
    >>> model = load_model()                       # the built-in spacevllm-tiny-shapes
    >>> result = ground("clip.mp4", "the red circle moving left", model=model)

Heavy modules (torch, transformers, decord) load on first use, so `stg --help` stays fast.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "ground", "load_model"]


def __getattr__(name: str):
    if name == "ground":
        from .pipeline import ground

        return ground
    if name == "load_model":
        from .weights import load_model

        return load_model
    if name == "evaluate":  # the module: evaluate.evaluate(), evaluate.plot(), ...
        import importlib

        return importlib.import_module(".evaluate", __name__)
    raise AttributeError(f"module 'stgcli' has no attribute {name!r}")
