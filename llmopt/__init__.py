"""llmopt: one GPT training step with toggles, measured honestly."""
from llmopt.model import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS"]
__version__ = "0.1.0"
