"""Postwarden lab."""
