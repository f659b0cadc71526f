"""What every command shares: loading the config, running a coroutine."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from typing import Any

from postwarden.config import Config, load_config


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run on uvloop when it is installed (it is a dependency), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def load(args: argparse.Namespace, **overrides: Any) -> Config:
    path = args.config or os.environ.get("POSTWARDEN_CONFIG")
    return load_config(path, overrides=overrides or None)


# ---------------------------------------------------------------------- commands
