"""Figure 8's broken release (copied over app.py): it raises while being imported, the way a
release with a missing setting does."""
import flask  # noqa: F401  (a real release imports its framework first)

raise RuntimeError("broken release: DATABASE_URL is not set")
