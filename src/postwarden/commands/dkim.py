"""``postwarden dkim genkey``: a DKIM key pair for a domain configured in the file."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger("postwarden")


def cmd_dkim_genkey(args: argparse.Namespace) -> int:
    from postwarden.mta.dkim import generate_key, load_key

    pem = generate_key(args.algorithm)
    with open(args.out, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(pem)
    key = load_key(args.domain, args.selector, args.out, args.algorithm)
    print(f'{args.selector}._domainkey.{args.domain} IN TXT "{key.public_txt()}"')
    return 0
