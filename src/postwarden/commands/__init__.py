"""The bodies of the ``postwarden`` commands, one module per area; ``postwarden.cli``
builds the parser and runs them."""
