"""Postwarden mta."""
