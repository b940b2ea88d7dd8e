"""Embedding Nudging for ComfyUI: regenerate flagged images instead of blanking them.

Importing this module has no side effects; ComfyUI calls comfy_entrypoint() to load the nodes.
"""
from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./js"
__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
