"""The routing server: Twisted adapters over the sans-IO core."""
