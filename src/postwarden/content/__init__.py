"""Email content (issue 20): templates rendered in a sandbox (``render``), the
variables every send provides (``variables``), lint findings (``lint``), plain text
from HTML (``text``) and the linear HTML walk both use (``markup``). Policy only: no
I/O; the control plane stores templates (``store.template_models``) and calls these.
"""
