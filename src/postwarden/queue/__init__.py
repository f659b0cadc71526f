"""Postwarden queue."""
