"""The control plane: HTTP API, auth, tenants' data (docs/decisions/0005)."""


class ControlPlaneError(RuntimeError):
    """The control plane cannot start (database not migrated, unreadable key…)."""
