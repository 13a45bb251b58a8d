from django.http import HttpResponse

import module_that_does_not_exist  # noqa: F401  -- the deliberate deploy bug


def index(request):
    return HttpResponse("unreachable")
