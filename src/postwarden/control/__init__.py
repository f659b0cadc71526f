"""Postwarden control."""
