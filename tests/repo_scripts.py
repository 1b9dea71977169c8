"""Loading a module of ``benchmarks/`` or ``scripts/`` by path.

Those folders hold tools that run as scripts (``python benchmarks/soak.py``), not packages, so
a test cannot import their modules by name. The module is registered in ``sys.modules`` under
its file's stem, as running the folder's scripts would name it: dataclasses look their module
up there, and a script that imports a sibling (``from steady_load import ...``) then gets the
same module object the test holds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """The module at ``relative_path`` (from the repository root), loaded once per session."""
    path = ROOT / relative_path
    name = path.stem
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
