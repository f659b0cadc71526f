"""Event webhooks out (issue 23; docs/decisions/0012), policy only: Standard Webhooks
signing and keys (``signing``) and the retry schedule (``retry``). The endpoints, the
outbox and the dispatcher are the control plane's."""
