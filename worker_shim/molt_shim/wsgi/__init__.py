"""WSGI over HTTP/1.1 without sockets: reading requests into environs, framing responses.

The engines own the sockets and threads; this package turns bytes into a request and an
environ (request.py) and an app's start_response/body into bytes (response.py).
"""
