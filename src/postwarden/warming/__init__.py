"""Postwarden warming."""
