"""Run one benchmark module in its own process: `python -m bench.run_one MODULE OUT.json`.

The module's `collect()` returns `Result`s; they go to OUT.json (with the module's `NOTES`) for
the driver. A module that raises leaves no OUT.json: the driver then reports it as not measured.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from bench.results import to_wire


def main(argv: list[str]) -> int:
    module = importlib.import_module(argv[0])
    results = module.collect()
    # NOTES: strings (for the module's first group) or (group, text) pairs
    notes = [
        {"group": n[0], "text": n[1]} if isinstance(n, tuple) else {"group": "", "text": str(n)}
        for n in getattr(module, "NOTES", ())
    ]
    doc = {"results": [to_wire(r) for r in results], "notes": notes}
    tmp = Path(argv[1] + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.rename(argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
