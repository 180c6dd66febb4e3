"""Optional dependencies of the integrations: a missing one says which extra installs it."""

from __future__ import annotations

import importlib


def require(module: str, extra: str, needed_by: str):
    """Import `module`, or raise ImportError naming the pip extra that installs it.

    Only the module itself being absent is turned into that message; an ImportError raised from inside an
    installed package (a broken install, a version clash) propagates unchanged with its own traceback.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] == top and e.name in (module, top):
            raise ImportError(f"{needed_by} needs {top}, which is not installed: pip install 'flatlora[{extra}]'",
                              name=e.name) from e
        raise
