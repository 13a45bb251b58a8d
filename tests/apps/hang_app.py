"""An app whose import never finishes (for the master's boot timeout)."""
import time

while True:
    time.sleep(3600)
