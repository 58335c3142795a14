"""llmopt: one GPT training step with toggles, measured honestly."""
from llmopt.model import GPT, GPTConfig, PRESETS

__all__ = ["GPT", "GPTConfig", "PRESETS"]
__version__ = "0.1.0"
