"""Every module of ``postwarden.control`` that declares /v1 operations is imported
where the app is built: a resource module that app.py forgets would serve nothing
and be missing from /openapi.json and /docs, with no other test to notice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import postwarden.control

CONTROL = Path(postwarden.control.__file__).parent

# A fresh interpreter: in this one, tests may have imported resource modules already.
PROBE = """
import json, sys
from postwarden.control.app import create_app
app = create_app(lambda: b"", lambda: (True, {}), plane=object(), serve_metrics=False)
from postwarden.control.api import api
print(json.dumps({
    "loaded": sorted(m for m in sys.modules if m.startswith("postwarden.control.")),
    "ops": [[op.method, op.path, op.handler.__module__] for op in api.ops],
}))
"""


def declaring_modules() -> set[str]:
    return {
        f"postwarden.control.{f.stem}"
        for f in CONTROL.glob("*.py")
        if "@api.op(" in f.read_text(encoding="utf-8")
    }


def test_every_module_that_declares_operations_is_imported_by_the_app() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    ).stdout
    seen = json.loads(out)
    declaring = declaring_modules()
    assert "postwarden.control.domains_api" in declaring  # the scan finds them
    assert declaring <= set(seen["loaded"]), declaring - set(seen["loaded"])
    assert {module for *_, module in seen["ops"]} == declaring
    # Each (method, path) is declared once.
    pairs = [(method, path) for method, path, _ in seen["ops"]]
    assert len(pairs) == len(set(pairs))
