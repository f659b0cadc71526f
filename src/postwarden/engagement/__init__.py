"""Engagement (issue 22, docs/decisions/0011): the signed tokens of a message's public
links. Pure policy: no I/O; the control plane serves the links and stores the hits."""
