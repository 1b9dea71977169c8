"""Runnable demonstrations (``python -m flowprefill_ray <command>``); each module has ``main``."""
