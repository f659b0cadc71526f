"""Postwarden store."""
