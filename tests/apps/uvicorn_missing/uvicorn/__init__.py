"""Shadows the real uvicorn to simulate a Python without it (tests the shim's error path)."""
raise ImportError("No module named 'uvicorn' (simulated by tests/apps/uvicorn_missing)")
