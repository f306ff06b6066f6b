"""Kept for compatibility: `fuse_gelu` lives in `alignloop.models.fast`."""
from alignloop.models.fast import fuse_gelu

__all__ = ["fuse_gelu"]
