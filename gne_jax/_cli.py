"""Command-line helpers shared by the two CLIs (light: no JAX, no training imports).

``config_error(sys.argv)`` says in one line what is wrong with ``--config`` before
``absl``/``ml_collections`` would: a config file that is missing, is not Python, has no
``get_config``, or whose ``get_config(arg)`` refuses its argument (``ml_collections``
defers these to a chained ``OSError`` traceback on first use, or a multi-line ``FATAL``
block), then the first ``--config.<field>`` override that the config does not have, with
the valid fields and the closest match (``ml_collections`` fails on it with a bare
``AttributeError`` traceback). Call it before ``app.run(main)``::

    message = config_error(sys.argv)
    if message is not None:
        raise SystemExit(f"error: {message}")
"""

from __future__ import annotations

import difflib
import os


def _config_arg(argv: list[str], name: str = "config") -> str | None:
    """The value of the last ``--<name>`` flag (the one absl uses), or None."""
    value = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_config_file(spec: str, name: str = "config"):
    """``(config, None)`` from ``--<name>=<file>[:<arg>]``, or ``(None, message)`` naming
    the flag, the file and what is wrong, in one line.

    Reads the file as ``ml_collections.config_flags`` does: relative to the working
    directory, the argument after the first ``:`` passed to ``get_config``.
    """
    from gne_jax.training.config import config_module  # noqa: PLC0415 (ml_collections only)

    path, *rest = spec.split(":", 1)
    arg = rest[0] if rest else None
    where = f"--{name}: {path}"
    if not path:
        return None, f"--{name}: empty path; expected a config file, e.g. configs/<name>.py"
    if os.path.isdir(path):
        return None, f"{where}: is a directory; expected a config file (.py)"
    if not os.path.isfile(path):
        return None, f"{where}: no such file; expected a config file (.py)"
    try:
        module = config_module(path)
    except SyntaxError as e:
        return None, f"{where}: syntax error at line {e.lineno}: {e.msg}"
    except Exception as e:  # noqa: BLE001  (anything the file raises while it is imported)
        return None, f"{where}: cannot be loaded: {type(e).__name__}: {_one_line(e)}"
    if not callable(getattr(module, "get_config", None)):
        return None, f"{where}: defines no get_config(); a config file must define one"
    call = "get_config()" if arg is None else f"get_config({arg!r})"
    if arg is not None:
        import inspect  # noqa: PLC0415

        try:
            inspect.signature(module.get_config).bind(arg)
        except TypeError as e:
            return None, (f"{where}: get_config{inspect.signature(module.get_config)} cannot "
                          f"take the one argument ':{arg}' gives ({_one_line(e)})")
        except ValueError:  # no signature to check: let the call tell
            pass
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except ValueError as e:  # the config's own message for a bad argument
        return None, f"{where}: {_one_line(e)}"
    except Exception as e:  # noqa: BLE001
        return None, f"{where}: {call} failed: {type(e).__name__}: {_one_line(e)}"
    if config is None:
        return None, f"{where}: {call} returned None; expected a ConfigDict"
    return config, None


def config_error(argv: list[str], name: str = "config") -> str | None:
    """A one-line message for a config file that cannot be loaded, or for the first
    ``--<name>.<field>`` override that the loaded config lacks; None when all is well
    (also when ``--<name>`` is absent: absl reports the missing required flag)."""
    spec = _config_arg(argv, name)
    if spec is None:
        return None
    config, message = load_config_file(spec, name)
    if message is not None:
        return message
    return _unknown_field(argv, config, name)


def _unknown_field(argv: list[str], config, name: str) -> str | None:
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
