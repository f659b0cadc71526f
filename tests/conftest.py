"""Shared fixtures: the lab and real peers are started here, never copied."""
