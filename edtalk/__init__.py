"""EDTalk / EDTalk++ talking-head model, pure PyTorch."""

from edtalk.config import ModelConfig
from edtalk.model import EDTalk, Identity

__all__ = ["EDTalk", "Identity", "ModelConfig"]
