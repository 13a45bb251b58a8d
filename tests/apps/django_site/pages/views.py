from django.http import HttpResponse


def index(request):
    return HttpResponse("django says hi")


def healthz(request):
    return HttpResponse("ok")
