"""Command-line helpers shared by the two CLIs (light: no JAX, no training imports).

``unknown_override(sys.argv)`` names the first ``--config.<field>`` override that the
config file does not have, with the valid fields and the closest match, before
``ml_collections`` would fail on it with a bare ``AttributeError`` traceback. Call it
before ``app.run(main)``::

    message = unknown_override(sys.argv)
    if message is not None:
        raise SystemExit(f"error: {message}")
"""

from __future__ import annotations

import difflib


def _config_arg(argv: list[str], name: str = "config") -> str | None:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def unknown_override(argv: list[str], name: str = "config") -> str | None:
    """A message naming the first ``--config.<field>`` override the config file lacks.

    ``ml_collections`` raises a bare ``AttributeError`` while parsing such a flag; this
    loads the config file alone and walks every override's dotted path instead.
    """
    from gne_jax.training.config import from_file  # noqa: PLC0415

    spec = _config_arg(argv, name)
    if spec is None:
        return None
    path, arg = spec, None
    if ".py:" in spec:
        path, arg = spec.split(".py:", 1)
        path += ".py"
    try:
        config = from_file(path, arg)
    except Exception:  # noqa: BLE001  (app.run reports problems of the file itself)
        return None
    for a in argv:
        if not a.startswith(f"--{name}."):
            continue
        field = a[len(name) + 3:].split("=", 1)[0]
        node, walked = config, []
        for part in field.split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = f"{name}." + ".".join(walked) if walked else name
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean --{where}.{close[0]}?" if close else ""
                return (f"--{name}.{field}: {where} has no field {part!r} (valid: "
                        f"{sorted(keys)}){hint}")
            node = node[part]
            walked.append(part)
    return None
