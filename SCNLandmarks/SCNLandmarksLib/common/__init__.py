"""Basics every group may use: atomic writes, user-facing errors, progress, device, user folders."""
