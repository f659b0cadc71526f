"""Postwarden dns."""
