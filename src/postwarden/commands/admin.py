"""``postwarden admin``: operator keys (create, list, revoke), straight in the control
database (store.keys)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from postwarden.commands.common import load, run_async
from postwarden.config import ConfigError

if TYPE_CHECKING:
    pass

log = logging.getLogger("postwarden")


def cmd_admin(args: argparse.Namespace) -> int:
    """Operator keys (scope ``admin``: tenants and their keys): ``create-key`` prints a
    new one once; ``list-keys`` lists them (never a secret); ``revoke-key ID`` revokes
    one (not the last one not revoked)."""
    from sqlalchemy import select

    from postwarden.store.db import create_engine, current_revision, head_revision, sessionmaker
    from postwarden.store.feed import record_change
    from postwarden.store.keys import LastOperatorKey, revoke_operator_key
    from postwarden.store.models import ApiKey
    from postwarden.store.secrets import new_api_key

    cfg = load(args)
    if args.action == "revoke-key" and args.id is None:
        print(
            "postwarden: admin revoke-key needs the key's id (see `admin list-keys`)",
            file=sys.stderr,
        )
        return 2
    if args.action != "revoke-key" and args.id is not None:
        print(f"postwarden: admin {args.action} takes no id", file=sys.stderr)
        return 2

    async def create(s: Any) -> int:
        new = new_api_key()
        s.add(
            ApiKey(
                tenant_id=None,
                prefix=new.prefix,
                secret_hash=new.secret_hash,
                name=args.name,
                scopes="admin",
            )
        )
        await record_change(s, "api_key", None, new.prefix)
        await s.commit()
        print(new.plaintext)
        print("(shown once; only its hash is stored)", file=sys.stderr)
        return 0

    async def list_keys(s: Any) -> int:
        stmt = select(ApiKey).where(ApiKey.tenant_id.is_(None)).order_by(ApiKey.id)
        rows = [
            {
                "id": k.id,
                "prefix": k.prefix,
                "name": k.name,
                "created_at": k.created_at.isoformat(),
                "last_used_at": k.last_used_at.isoformat() if k.last_used_at else None,
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in (await s.execute(stmt)).scalars()
        ]
        if args.json:
            for row in rows:
                print(json.dumps(row))
            return 0
        if not rows:
            print("no operator keys: make one with `postwarden admin create-key`")
            return 0
        print(
            f"{'ID':>6}  {'PREFIX':<12}  {'CREATED':<19}  {'LAST USED':<19}  {'REVOKED':<19}  NAME"
        )
        for row in rows:
            times = [
                (row[c] or "-")[:19].replace("T", " ")
                for c in ("created_at", "last_used_at", "revoked_at")
            ]
            print(
                f"{row['id']:>6}  {row['prefix']:<12}  {times[0]:<19}  {times[1]:<19}"
                f"  {times[2]:<19}  {row['name']}"
            )
        return 0

    async def revoke_key(s: Any) -> int:
        try:
            key = await revoke_operator_key(s, args.id)
        except LastOperatorKey as exc:
            print(f"postwarden: refused: {exc}", file=sys.stderr)
            return 1
        if key is None:
            print(f"postwarden: no operator key with id {args.id}", file=sys.stderr)
            return 1
        await s.commit()
        assert key.revoked_at is not None
        print(f"revoked operator key {key.id} ({key.prefix}) at {key.revoked_at.isoformat()}")
        return 0

    async def run() -> int:
        if await current_revision(cfg.database.url) != head_revision():
            raise ConfigError("database.url: not migrated: run `postwarden db upgrade` first")
        engine = create_engine(cfg.database.url)
        actions = {"create-key": create, "list-keys": list_keys, "revoke-key": revoke_key}
        try:
            async with sessionmaker(engine)() as s:
                return await actions[args.action](s)
        finally:
            await engine.dispose()

    return int(run_async(run()))
