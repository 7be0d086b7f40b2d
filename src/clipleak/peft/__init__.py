"""The victim: a frozen CLIP with the client's trainable module (CoOp, CLIP-Adapter, or a fine-tune mode)."""

from .adapter import ClipAdapter
from .config import FLAT_PEFT_KEYS, METHODS, Method, PeftConfig
from .coop import PromptLearner
from .rebuild import rebuild_victim
from .victim import Victim, build_victim

__all__ = ["FLAT_PEFT_KEYS", "METHODS", "ClipAdapter", "Method", "PeftConfig", "PromptLearner", "Victim",
           "build_victim", "rebuild_victim"]
