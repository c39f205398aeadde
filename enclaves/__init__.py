"""Enclaves: a self-hosted, end-to-end encrypted instant messenger on Twisted."""

__version__ = "0.1.0"
