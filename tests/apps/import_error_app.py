"""An app module that fails to import: the worker must exit 3 with ERROR= naming the error."""
raise RuntimeError("deliberate import failure in import_error_app")
