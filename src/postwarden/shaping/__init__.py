"""Postwarden shaping."""
