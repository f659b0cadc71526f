"""Postwarden bounces."""
