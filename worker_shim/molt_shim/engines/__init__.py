"""HTTP engines side by side, each implementing engines/base.py's Engine interface."""
