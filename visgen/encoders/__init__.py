"""Frozen representation encoders REPA aligns with: DINOv2 (ImageNet presets) and a label-free digits encoder."""

from visgen.encoders.base import AlignmentEncoder
from visgen.encoders.dinov2 import DINOv2Encoder

__all__ = ["AlignmentEncoder", "DINOv2Encoder"]
