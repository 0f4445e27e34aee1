"""Stapes: an Incus-shaped instance server built to move instances between servers."""

__version__ = "0.1.0"
