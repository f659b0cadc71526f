"""Postwarden: a self-hosted email appliance."""

__version__ = "0.1.0"
