"""Encrypted-at-rest storage of users and pending messages (DESIGN.md §7)."""
