"""Email content (issue 20): templates rendered in a sandbox (``render``), the
variables every send provides (``variables``), lint findings (``lint``), plain text
from HTML (``text``) and the linear HTML walk both use (``markup``), and the visual
builder's designs compiled to email HTML (``design``). Policy only: no I/O; the
control plane stores templates (``store.template_models``) and calls these.
"""
