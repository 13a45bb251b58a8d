"""The ASGI cycle's response side, in this process: the extension's AsgiCycle
(worker_shim/native/asgi_cycle.cpp) against asgi_cycle.PyCycleBase, the same rules in Python,
message for message. Every case runs on both and must leave the same bytes written, the same
transport calls, the same fields, and the same exception (type and text); the cases are also
checked against what the response must be. The ASGI suite (test_asgi.py) runs both behind the
real master; this table covers the corners one request at a time."""
import os
import sys

import pytest

from harness import HAVE_NATIVE, NATIVE_PRELOAD, SHIM_DIR, native_extension

pytestmark = pytest.mark.skipif(not HAVE_NATIVE or bool(NATIVE_PRELOAD),
                                reason="needs the extension, unsanitized, in this process")


def load():
    """asgi_cycle with the extension from the build tree (load_extension() finds it in
    sys.modules), and the extension."""
    native = native_extension()
    sys.path.insert(0, SHIM_DIR)
    os.environ.pop("MOLT_SHIM_CYCLE", None)
    from molt_shim.engines import asgi_cycle
    return asgi_cycle, native


class Failed(Exception):
    """What a callback that fails raises."""


class Transport:
    """A transport that notes every call in the shared log; `closing` is what is_closing()
    answers; `fail` names the method that raises; `on_write(transport)` runs in each write."""

    def __init__(self, log, closing=False, fail=None, on_write=None):
        self.calls = log
        self.closing = closing
        self.fail = fail
        self.on_write = on_write

    def _note(self, *call):
        self.calls.append(call)
        if self.fail == call[0]:
            raise Failed(call[0])

    def write(self, data):
        self._note("write", bytes(data))
        if self.on_write is not None:
            self.on_write(self)

    def writelines(self, parts):
        self._note("writelines", tuple(bytes(p) for p in parts))

    def close(self):
        self._note("close")
        self.closing = True

    def is_closing(self):
        if self.fail == "is_closing":
            raise Failed("is_closing")
        return self.closing


class Flow:
    write_paused = False
    read_paused = False


class Ctl:
    def __init__(self, default_close=False):
        self.default_head = b"date: x\r\nserver: molt\r\n"
        self.default_close = default_close
        self.unsent_heads = []

    def flush_heads(self):
        pass


class Loop:
    def __init__(self):
        self.soon = []

    def call_soon(self, fn):
        self.soon.append(fn)


class Protocol:
    def __init__(self, ctl, transport, fail=None):
        self.ctl = ctl
        self.transport = transport
        self.flow = Flow()
        self.loop = Loop()
        self.completed = 0
        self.fail = fail

    def on_response_complete(self):
        self.completed += 1
        self.transport.calls.append(("on_response",))
        if self.fail == "on_response":
            raise Failed("on_response")


class Waiter:
    """A receive() waiting (what Cycle.wake() sets a result on)."""

    def __init__(self, log):
        self.log = log
        self.woken = False

    def done(self):
        return self.woken

    def set_result(self, _):
        self.woken = True
        self.log.append(("wake",))


class Bytes:
    """A body that is not bytes but converts to them (`%b` takes it)."""

    def __bytes__(self):
        return b"conv"

    def __len__(self):
        return 4


class Message(dict):
    """A message that is a dict subclass with its own lookups."""

    def __missing__(self, key):
        raise KeyError("missing " + key)

    def get(self, key, default=None):
        return b"from get" if key == "body" else dict.get(self, key, default)


class Hook:
    """What the cycle asks of a SuspendHook that is not the extension's."""

    def __init__(self, running):
        self.running = running


def start(status=200, headers=(), **extra):
    return dict({"type": "http.response.start", "status": status, "headers": list(headers)},
                **extra)


def body(data=b"", more=False):
    return {"type": "http.response.body", "body": data, "more_body": more}


HELLO = [(b"content-type", b"text/plain"), (b"content-length", b"5")]
FIELDS = ("keep_alive", "waiting_for_100_continue", "response_started", "response_complete",
          "chunked", "remaining", "head", "disconnected")

# name: (messages, request (method, version, asked_close, keep_alive), what else)
CASES = {
    "hello": ([start(200, HELLO), body(b"hello")], {}),
    "hello twice over the remembered fields": ([start(200, HELLO), body(b"hel", True),
                                                body(b"lo")], {}),
    "chunked": ([start(200, [(b"content-type", b"text/plain")]), body(b"ab", True),
                 body(b"", True), body(b"c")], {}),
    "chunked, empty end": ([start(200), body(b"abc", True), body()], {}),
    "the app's own chunked": ([start(200, [(b"Transfer-Encoding", b"chunked")]),
                               body(b"x" * 20)], {}),
    "HEAD without a length": ([start(200), body(b"ignored")], {"method": "HEAD"}),
    "HEAD with a length": ([start(200, HELLO), body(b"")], {"method": "HEAD"}),
    "HTTP/1.0 without a length": ([start(200), body(b"abc", True), body(b"de")],
                                  {"version": "1.0", "keep_alive": False}),
    "304 with a length": ([start(304, HELLO), body()], {}),
    "204": ([start(204), body()], {}),
    "shorter than its length": ([start(200, HELLO), body(b"hey")], {}),
    "longer than its length": ([start(200, HELLO), body(b"hello!")], {}),
    "connection: close from the app": ([start(200, HELLO + [(b"Connection", b"Close")]),
                                        body(b"hello")], {}),
    "asked to close": ([start(200, HELLO), body(b"hello")], {"asked_close": True, "keep_alive": False}),
    "draining (default close)": ([start(200, HELLO), body(b"hello")], {"default_close": True}),
    "a CR/LF in a value": ([start(200, [(b"x-a", b"1\r\nx-evil: 1")])], {}),
    "a space in a name": ([start(200, [(b"x a", b"1")])], {}),
    "a length that is not digits": ([start(200, [(b"content-length", b"-1")])], {}),
    "pairs as lists": ([start(200, [[b"content-type", b"text/plain"],
                                    [b"content-length", b"2"]]), body(b"ok")], {}),
    "a body before the head": ([body(b"x")], {}),
    "a second start": ([start(200, HELLO), start(200)], {}),
    "after the end": ([start(200, HELLO), body(b"hello"), body(b"more")], {}),
    "no type": ([{"status": 200}], {}),
    "an unknown status": ([start(99)], {}),
    "no status": ([{"type": "http.response.start"}], {}),
    "no headers key, no body key": ([{"type": "http.response.start", "status": 200},
                                     {"type": "http.response.body"}], {}),
    "a large body goes by writelines": ([start(200, [(b"content-length", b"20000")]),
                                         body(b"y" * 20000)], {}),
    "a bytearray and a memoryview": ([start(200), body(bytearray(b"ab"), True),
                                      body(memoryview(b"cd"))], {}),
    "a bytearray under a length": ([start(200, [(b"content-length", b"2")]),
                                    body(bytearray(b"ab"))], {}),
    "a str body": ([start(200, HELLO), body("hello")], {}),
    "closed under the app": ([start(200, HELLO), body(b"hello")], {"closing": True}),
    "disconnected": ([start(200, HELLO), body(b"hello")], {"disconnected": True}),
    "the head waits while the app runs": ([start(200, HELLO)], {"hook": True}),
    "the head is queued without a running app": ([start(200, HELLO)], {"hook": False}),
    "a float status": ([start(304.0, HELLO), body()], {}),
    "a None status": ([start(None)], {}),
    "a tuple status": ([start((200,))], {}),
    "a tuple type": ([{"type": ("x",), "status": 200}], {}),
    "a body of None, chunked": ([start(200), body(b"a", True), {"type": "http.response.body",
                                                                 "body": None}], {}),
    "a body of 0, chunked": ([start(200), body(0)], {}),
    "a body with __bytes__, chunked": ([start(200), body(Bytes())], {}),
    "a list of ints, chunked": ([start(200), body([104, 105])], {}),
    "a str body, chunked": ([start(200), body("hi")], {}),
    "a memoryview of shorts, chunked": ([start(200), body(memoryview(
        __import__("array").array("H", [1, 2, 3])))], {}),
    "a dict subclass": ([Message(start(200)), Message(type="http.response.body",
                                                             more_body=False)], {}),
    "a dict subclass without a type": ([Message(status=200)], {}),
    "the write fails": ([start(200, HELLO), body(b"hello")], {"fail": "write"}),
    "writelines fails": ([start(200, [(b"content-length", b"20000")]), body(b"y" * 20000)],
                         {"fail": "writelines"}),
    "is_closing fails": ([start(200, HELLO), body(b"hello")], {"fail": "is_closing"}),
    "the close fails": ([start(200, HELLO), body(b"hello")], {"fail": "close",
                                                              "asked_close": True,
                                                              "keep_alive": False}),
    "on_response fails": ([start(200, HELLO), body(b"hello")], {"fail": "on_response"}),
    "a write swaps the transport": ([start(200), body(b"a", True), body(b"b", True), body()],
                                    {"on_write": "swap", "asked_close": True, "keep_alive": False}),
    "a write disconnects": ([start(200), body(b"a", True), body(b"b")],
                            {"on_write": "disconnect"}),
    "a write takes the length away": ([start(200, HELLO), body(b"hel", True), body(b"lo")],
                                      {"on_write": "delete remaining"}),
    "receive() waits": ([start(200, HELLO), body(b"hello")], {"waiters": True}),
    "no scope": ([start(200), body()], {"delete": "scope"}),
    "no keep_alive": ([start(200, HELLO)], {"delete": "keep_alive"}),
    "no hook": ([start(200, HELLO)], {"delete": "hook"}),
    "no transport": ([start(200, HELLO), body(b"hello")], {"delete": "transport"}),
    "no on_response": ([start(200, HELLO), body(b"hello")], {"delete": "on_response"}),
    "the extension's hook, running": ([start(200, HELLO), body(b"hello")], {"real_hook": True}),
}


def run(base_cycle, rules_of, messages, opts, native=None):
    log = []
    ctl = Ctl(opts.get("default_close", False))
    transport = Transport(log, opts.get("closing", False), opts.get("fail"))
    protocol = Protocol(ctl, transport, opts.get("fail"))
    scope = {"method": opts.get("method", "GET"), "http_version": opts.get("version", "1.1")}
    cycle = base_cycle(rules_of(ctl), protocol, scope, opts.get("keep_alive", True),
                       opts.get("asked_close", False), False)
    if opts.get("disconnected"):
        cycle.disconnected = True
    if "hook" in opts:
        cycle.hook = Hook(opts["hook"])
    if opts.get("waiters"):
        cycle.waiters = [Waiter(log)]
    if "delete" in opts:
        delattr(cycle, opts["delete"])
    on_write = opts.get("on_write")
    if on_write == "swap":  # a callback gives the cycle another transport
        def swap(old):
            if not getattr(old, "swapped", False):
                old.swapped = True
                cycle.transport = Transport(log)
        transport.on_write = swap
    elif on_write == "disconnect":
        transport.on_write = lambda _: setattr(cycle, "disconnected", True)
    elif on_write == "delete remaining":
        transport.on_write = lambda _: delattr(cycle, "remaining")
    outcome = None

    def deliver_all():
        for message in messages:
            cycle.deliver(message)

    try:
        if opts.get("real_hook"):
            async def app():
                deliver_all()

            hook = cycle.hook = native.suspend_hook(app(), lambda: None)
            try:
                hook.send(None)
            except StopIteration:
                pass
        else:
            deliver_all()
    except Exception as exc:  # the app's error: both must raise the same
        outcome = (type(exc).__name__, str(exc).replace(type(cycle).__name__, "Cycle"))
    fields = {name: getattr(cycle, name, "<unset>") for name in FIELDS}
    return {"calls": log, "fields": fields, "raised": outcome,
            "completed": protocol.completed, "queued": len(ctl.unsent_heads),
            "soon": len(protocol.loop.soon)}


@pytest.fixture(scope="module")
def modules():
    return load()


@pytest.fixture(scope="module")
def bases(modules):
    asgi_cycle, native = modules
    assert asgi_cycle.Cycle.__bases__[0] is native.AsgiCycle  # the extension's, by default
    methods = {k: v for k, v in vars(asgi_cycle.Cycle).items()
               if callable(v) and not k.startswith("__")}
    py_cycle = type("PyCycle", (asgi_cycle.PyCycleBase,), dict(methods, __slots__=()))
    native_rules = asgi_cycle.cycle_rules
    return {"native": (asgi_cycle.Cycle, native_rules),
            "python": (py_cycle, lambda ctl: ctl)}


@pytest.mark.parametrize("warm", [False, True], ids=["fields new", "fields known"])
@pytest.mark.parametrize("name", list(CASES))
def test_both_cycles_answer_alike(modules, bases, name, warm):
    """Each case on each base, with the remembered header fields empty (each field goes through
    header_line()) or holding them from a run before."""
    asgi_cycle, native = modules
    messages, opts = CASES[name]

    def answer(which):
        asgi_cycle.KNOWN_HEADERS.clear()
        if warm:
            run(*bases[which], messages, opts, native)
        return run(*bases[which], messages, opts, native)

    assert answer("native") == answer("python")


def written(result):
    out = b""
    for call in result["calls"]:
        if call[0] == "write":
            out += call[1]
        elif call[0] == "writelines":
            out += b"".join(call[1])
    return out


def test_what_the_answers_are(bases):
    """The table's answers themselves (on the extension's cycle; the test above holds the
    other to it)."""
    cycle, rules = bases["native"]

    def answer(name):
        return run(cycle, rules, *CASES[name], sys.modules["_molt_native"])

    hello = answer("hello")
    assert written(hello) == (b"HTTP/1.1 200 OK\r\ndate: x\r\nserver: molt\r\n"
                              b"content-type: text/plain\r\ncontent-length: 5\r\n\r\nhello")
    assert [c[0] for c in hello["calls"]] == ["write", "on_response"]  # head and body: one write
    assert hello["completed"] == 1 and hello["fields"]["keep_alive"] is True
    assert written(answer("chunked")).endswith(
        b"transfer-encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
    assert written(answer("chunked, empty end")).endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert written(answer("HEAD without a length")).endswith(b"server: molt\r\n\r\n")
    assert written(answer("HTTP/1.0 without a length")).endswith(b"molt\r\n\r\nabcde")
    no_content = answer("304 with a length")
    assert written(no_content).endswith(b"content-length: 5\r\n\r\n")
    assert no_content["completed"] == 1
    assert answer("shorter than its length")["raised"] == (
        "RuntimeError", "Response content shorter than Content-Length")
    assert answer("longer than its length")["raised"] == (
        "RuntimeError", "Response content longer than Content-Length")
    closed = answer("connection: close from the app")
    assert closed["calls"][-2:] == [("close",), ("on_response",)]
    assert closed["fields"]["keep_alive"] is False
    assert b"connection: close\r\n\r\n" in written(answer("asked to close"))
    draining = answer("draining (default close)")
    assert draining["calls"][-2] == ("close",)
    for name in ("a CR/LF in a value", "a space in a name", "a length that is not digits"):
        invalid = answer(name)
        assert invalid["raised"] == ("RuntimeError", "Invalid HTTP header %s." % (
            "name" if "name" in name else "value"))
        # A head that is not valid changes nothing: the app's 500 can still go.
        assert invalid["fields"]["response_started"] is False and invalid["calls"] == []
    assert answer("a body before the head")["raised"] == (
        "RuntimeError", "Expected ASGI message 'http.response.start', but got "
        "'http.response.body'.")
    assert answer("after the end")["raised"] == (
        "RuntimeError", "Unexpected ASGI message 'http.response.body' sent, after response "
        "already completed.")
    assert answer("no type")["raised"] == ("KeyError", "'type'")
    assert answer("an unknown status")["raised"] == ("KeyError", "99")
    assert answer("a large body goes by writelines")["calls"][0][0] == "writelines"
    assert written(answer("a bytearray and a memoryview")).endswith(
        b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")
    assert answer("a str body")["raised"][0] == "TypeError"
    gone = answer("closed under the app")
    assert gone["calls"] == [("on_response",)]  # nothing written, and the response ends
    assert answer("disconnected")["calls"] == []
    held = answer("the head waits while the app runs")
    assert held["queued"] == 0 and held["fields"]["head"].startswith(b"HTTP/1.1 200 OK")
    queued = answer("the head is queued without a running app")
    assert (queued["queued"], queued["soon"]) == (1, 1)
    real = answer("the extension's hook, running")
    assert real["queued"] == 0 and [c[0] for c in real["calls"]] == ["write", "on_response"]
    assert [c[0] for c in answer("receive() waits")["calls"]] == ["write", "wake", "on_response"]
    assert [c[0] for c in answer("asked to close")["calls"]] == ["write", "close", "on_response"]
    assert answer("a body of None, chunked")["completed"] == 1
    assert written(answer("a body with __bytes__, chunked")).endswith(b"4\r\nconv\r\n0\r\n\r\n")
    assert answer("a dict subclass without a type")["raised"] == ("KeyError", "'missing type'")
    assert written(answer("a dict subclass")).endswith(b"8\r\nfrom get\r\n0\r\n\r\n")
    assert answer("the write fails")["raised"] == ("Failed", "write")
    assert answer("on_response fails")["raised"] == ("Failed", "on_response")
    assert answer("no scope")["raised"][0] == "AttributeError"
    swapped = answer("a write swaps the transport")
    assert [c[0] for c in swapped["calls"]] == ["write", "write", "write", "close",
                                                "on_response"]


def test_a_cycle_needs_its_rules(bases):
    cycle, rules = bases["native"]
    ctl = Ctl()
    protocol = Protocol(ctl, Transport([]))
    with pytest.raises(TypeError, match="asgi_cycle_rules"):
        cycle(ctl, protocol, {}, True, False, False)
    made = cycle(rules(ctl), protocol, {"method": "GET", "http_version": "1.1"}, True, False,
                 False)
    # Its fields are Python's: the protocol and the ticks read and set them.
    made.more_body = False
    made.waiters = []
    assert (made.more_body, made.waiters, made.body, made.remaining) == (False, [], b"", 0)
