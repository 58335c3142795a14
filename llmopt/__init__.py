"""llmopt: one GPT training step with toggles, measured honestly.

``GPT``, ``GPTConfig`` and ``PRESETS`` are loaded on first use (PEP 562), so that importing a submodule that
needs no torch (``llmopt.launch``, ``llmopt.scratch``: what a SLURM or submitit job's wrapper runs before it
starts the config) does not import torch through this package."""
__all__ = ["GPT", "GPTConfig", "PRESETS"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        from llmopt import model
        from llmopt.core import shapes

        return getattr(model if name == "GPT" else shapes, name)
    raise AttributeError(f"module 'llmopt' has no attribute {name!r}")
