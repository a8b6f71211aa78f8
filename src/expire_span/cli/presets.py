"""``expire-span presets``: list the named hyperparameter sets."""

from __future__ import annotations

import json

from expire_span.training import DEFAULT_PRESETS, PRESETS


def run(argv: list[str]) -> int:
    if argv and argv[0] not in ("--json",):
        raise ValueError(f"unexpected argument {argv[0]!r} (only --json is accepted)")
    if argv:
        print(json.dumps({n: p.config for n, p in sorted(PRESETS.items())}, indent=2))
        return 0
    defaults = set(DEFAULT_PRESETS.values())
    width = max(len(name) for name in PRESETS)
    for name, preset in sorted(PRESETS.items()):
        mark = "*" if name in defaults else " "
        print(f"{mark} {name:<{width}}  [{preset.config.get('task')}] {preset.description}")
    print("\n* the task's default when no --preset is given; `expire-span presets --json` "
          "prints every value")
    return 0
