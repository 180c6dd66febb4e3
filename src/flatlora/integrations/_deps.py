"""Optional dependencies of the integrations: a missing one says which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str | tuple[str, ...], extra: str, needed_by: str) -> ModuleType:
    """Import `module`, or raise ImportError naming the pip extra that installs it.

    `module` may be a tuple of alternatives, tried in order: the first one installed is returned (e.g.
    `("lightning.pytorch", "pytorch_lightning")`), and the error names them all when none is.
    Only a module itself being absent moves on to the next or becomes that message; an ImportError raised
    from inside an installed package (a broken install, a version clash) propagates unchanged with its
    own traceback.
    """
    names = (module,) if isinstance(module, str) else tuple(module)
    if not names:
        raise ValueError("require() needs at least one module name")
    first_missing: ImportError | None = None
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            if not _absent(e, name):
                raise
            first_missing = first_missing or e
    tops = list(dict.fromkeys(n.split(".")[0] for n in names))
    what = tops[0] + (f" (or {', '.join(tops[1:])})" if len(tops) > 1 else "")
    raise ImportError(f"{needed_by} needs {what}, which is not installed: pip install 'flatlora[{extra}]'",
                      name=first_missing.name) from first_missing


def _absent(e: ImportError, module: str) -> bool:
    """Whether `e` says `module` (or its top-level package) is not installed, rather than broken."""
    top = module.split(".")[0]
    return e.name is not None and e.name.split(".")[0] == top and e.name in (module, top)
