"""Campaigns: lifecycle, send windows, A/B tests (issue 21)."""
