from django.urls import path

from pages import broken_views

urlpatterns = [path("", broken_views.index), path("healthz", broken_views.index)]
