"""Minimal Django settings for the shim's end-to-end tests."""
import os

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_KEY = "molt-test-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "test"]
INSTALLED_APPS = ["pages"]
MIDDLEWARE = []
# The broken variant swaps in a URLconf whose views module cannot be imported: Django only
# imports it on the first request, which is exactly what the warm-up must catch (exit 4).
ROOT_URLCONF = os.environ.get("DJANGO_URLCONF", "mysite.urls")
DATABASES = {}
USE_TZ = True
LOGGING_CONFIG = None
