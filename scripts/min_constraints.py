"""Print pip constraints that pin every dependency of pyproject.toml to its declared minimum.

    python scripts/min_constraints.py > min.txt && pip install -c min.txt -e .

Each entry of [project] dependencies must have a floor (`name>=X`, with other clauses allowed beside it:
`name>=X,<Y`); it becomes `name==X` (an environment marker after `;` is kept). An entry without a floor
is an error: an unstated minimum cannot be checked. Used by .ci/run's min-versions job, which installs
the package this way and runs `dreambooth-singlora demo` on it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ENTRY = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")


def floors(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out, missing = [], []
    for dep in deps:
        m = ENTRY.match(dep)
        if not m:
            sys.exit(f"min_constraints: cannot parse dependency {dep!r} in {pyproject}")
        name, _extras, spec, marker = m.groups()
        low = [c.strip()[2:].strip() for c in spec.split(",") if c.strip().startswith(">=")]
        if len(low) != 1:
            missing.append(dep)
            continue
        out.append(f"{name}=={low[0]}" + (f" {marker}" if marker else ""))
    if missing:
        sys.exit(f"min_constraints: no single '>=' floor in {missing} ({pyproject}): give every dependency one")
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(floors(root / "pyproject.toml" if root.is_dir() else root)))
