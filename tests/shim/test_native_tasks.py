"""How the ASGI engine's asyncio tasks are started and registered with the extension: its
TaskStarter (worker_shim/native/task_starter.cpp), loop.create_task() for less, on uvloop and
asyncio's own loop; and its TaskRegistry (task_registry.cpp), WeakSet.add and its references'
callback in C, installed as the add() of the WeakSet asyncio keeps its tasks in
(engines/uvicorn_asgi.py, install_native_tasks()), held to a plain WeakSet operation for
operation, in this process, and run under asyncio in a worker-like process of its own."""
import asyncio
import contextvars
import gc
import os
import random
import subprocess
import sys
import textwrap
import weakref

import pytest

from harness import HAVE_NATIVE, NATIVE_DIR, NATIVE_PRELOAD, SHIM_DIR, native_extension

pytestmark = pytest.mark.skipif(not HAVE_NATIVE or bool(NATIVE_PRELOAD),
                                reason="needs the extension, unsanitized, in this process")


class Item:
    """Hashed by identity, weakly referenceable: what a task is to the set."""


def with_registry():
    ws = weakref.WeakSet()
    ws.add = native_extension().task_registry(ws.data, ws._pending_removals, ws._iterating).add
    return ws


def state(ws, items):
    """What a reader of the set can see, and its bookkeeping."""
    return (len(ws), [item in ws for item in items], len(ws.data), len(ws._pending_removals),
            len(ws._iterating))


def test_a_registry_keeps_a_weakset_as_weakset_add_does():
    """Random operations on a plain WeakSet and on one whose add() is a TaskRegistry's, on the
    same items: adds (new and again), items freed while nothing iterates and while one or two
    iterations are open (their removals wait; an add commits them, as does the end of the
    last iteration), discards, iterations closed, full iterations: after every one both sets
    look the same. (A WeakSet changed under an open iteration raises if that iteration goes
    on, as asyncio.all_tasks() knows: open ones here are only ever closed.)"""
    rng = random.Random(1412)
    plain, fast = weakref.WeakSet(), with_registry()
    items, iterators = [], []
    for step in range(4000):
        op = rng.random()
        if op < 0.35 or not items:
            item = Item() if op < 0.25 or not items else rng.choice(items)
            if item not in items:
                items.append(item)
            plain.add(item)
            fast.add(item)
        elif op < 0.6:
            items.pop(rng.randrange(len(items)))  # the last strong reference: both callbacks run
        elif op < 0.7 and len(iterators) < 2:
            pair = (iter(plain), iter(fast))
            for it in pair:
                next(it, None)  # the first item: the iteration is open (its guard entered)
            iterators.append(pair)
        elif op < 0.8 and iterators:
            for it in iterators.pop(rng.randrange(len(iterators))):
                it.close()  # the guard leaves: with no other iteration, removals are committed
        elif op < 0.9:
            item = rng.choice(items)
            plain.discard(item)
            fast.discard(item)
        else:
            assert {id(x) for x in plain} == {id(x) for x in fast}
        assert state(plain, items) == state(fast, items), step
    iterators.clear()
    items.clear()
    gc.collect()
    assert state(plain, []) == state(fast, []) == (0, [], 0, 0, 0)


def test_a_registry_holds_what_add_needs_and_rejects_anything_else():
    native = native_extension()
    with pytest.raises(TypeError):
        native.task_registry([], [], set())
    with pytest.raises(TypeError):
        type(native.task_registry(set(), [], set()))()
    ws = with_registry()
    with pytest.raises(TypeError):
        ws.add([])  # not weakly referenceable: the same error as WeakSet.add's
    with pytest.raises(TypeError):
        weakref.WeakSet().add([])
    kind = type(native.task_registry(set(), [], set()))
    registries = [native.task_registry(set(), [], set()) for _ in range(10)]
    del registries, ws
    gc.collect()
    # Each one's drop() refers back to it: the collector frees the pairs.
    assert not [obj for obj in gc.get_objects() if type(obj) is kind]


def test_asyncio_sees_every_task_through_the_registry_and_forgets_finished_ones():
    """A process set up as a worker (install_native_tasks() on asyncio's own WeakSet) runs
    tasks: all_tasks() lists exactly those not done, finished ones leave the set when freed
    (those freed while it is iterated: the first test), and MOLT_SHIM_TASKS=python leaves the
    registry as it was."""
    script = textwrap.dedent("""
        import asyncio, gc, importlib.util, os, sys
        spec = importlib.util.spec_from_file_location("_molt_native", sys.argv[1])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_molt_native"] = module
        sys.path.insert(0, sys.argv[2])
        from molt_shim.engines.uvicorn_asgi import install_native_tasks
        registry = asyncio.tasks._all_tasks
        kind = install_native_tasks()
        assert install_native_tasks() == kind  # twice (a second engine): no second wrapper
        print(kind, "add" in vars(registry))

        async def sleeper(event):
            await event.wait()

        async def main():
            event = asyncio.Event()
            loop = asyncio.get_running_loop()
            waiting = {loop.create_task(sleeper(event)) for _ in range(50)}
            done = [loop.create_task(asyncio.sleep(0)) for _ in range(50)]
            await asyncio.gather(*done)
            del done
            gc.collect()
            assert asyncio.all_tasks() == waiting | {asyncio.current_task()}
            event.set()
            await asyncio.gather(*waiting)
            del waiting
            gc.collect()
            return len(asyncio.all_tasks())

        running = asyncio.run(main())
        gc.collect()
        print(running, len(registry.data), len(registry._pending_removals))
    """)
    native = os.path.join(NATIVE_DIR, "_molt_native.abi3.so")
    for env, expected in (({}, "native True"), ({"MOLT_SHIM_TASKS": "python"}, "python False")):
        out = subprocess.run([sys.executable, "-c", script, native, SHIM_DIR],
                             env=dict(os.environ, **env), capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        kind, counts = out.stdout.splitlines()
        assert kind == expected
        assert counts == "1 0 0", out.stdout  # main() alone, then nothing left behind


def new_loop(kind):
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


LOOPS = ["uvloop", "asyncio"]


@pytest.mark.parametrize("kind", LOOPS)
def test_a_starter_starts_a_task_as_create_task_does(kind):
    """Each task runs in a copy of the starter's caller's context, is the current task while
    it runs, is in all_tasks(), can be cancelled, and is named request-N."""
    loop = new_loop(kind)
    starter = native_extension().task_starter(loop, asyncio.Task)
    var = contextvars.ContextVar("var", default="outside")

    async def body(i):
        var.set(i)
        await asyncio.sleep(0)
        return asyncio.current_task().get_name(), var.get(), asyncio.current_task() is me[i]

    async def main():
        me.extend(starter(body(i)) for i in range(3))
        assert all(type(t) is asyncio.Task and t.get_loop() is loop for t in me)
        assert set(me) <= asyncio.all_tasks()
        results = await asyncio.gather(*me)
        assert var.get() == "outside"
        sleeper = starter(asyncio.sleep(10))
        await asyncio.sleep(0)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        return results, sleeper.get_name()

    me = []
    try:
        results, last = loop.run_until_complete(main())
    finally:
        loop.close()
    assert results == [("request-1", 0, True), ("request-2", 1, True), ("request-3", 2, True)]
    assert last == "request-4"


@pytest.mark.parametrize("kind", LOOPS)
def test_a_loop_with_a_task_factory_gets_create_task(kind):
    """An app that sets a task factory (instrumentation, say) sees every request's task made
    by it, as under loop.create_task()."""
    loop = new_loop(kind)
    starter = native_extension().task_starter(loop, asyncio.Task)
    made = []

    def factory(loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        made.append(task)
        return task

    async def noop():
        return 7

    async def main():
        loop.set_task_factory(factory)
        task = starter(noop())
        assert await task == 7
        loop.set_task_factory(None)
        plain = starter(noop())
        assert await plain == 7
        return task, plain

    try:
        task, plain = loop.run_until_complete(main())
    finally:
        loop.close()
    assert made == [task] and plain not in made and plain.get_name() == "request-1"


@pytest.mark.parametrize("kind", LOOPS)
def test_a_starter_refuses_what_create_task_refuses(kind, caplog):
    loop = new_loop(kind)
    starter = native_extension().task_starter(loop, asyncio.Task)

    async def noop():
        pass

    for args, kwargs in (((), {}), ((1, 2), {}), ((None,), {"name": "x"})):
        with pytest.raises(TypeError):
            starter(*args, **kwargs)
    with pytest.raises(TypeError):
        type(starter)()
    loop.close()
    coroutine = noop()
    with pytest.raises(RuntimeError):  # a closed loop, as create_task() says, and no task
        starter(coroutine)  # is made (asyncio would log one destroyed while pending)
    coroutine.close()
    gc.collect()
    assert "destroyed but it is pending" not in caplog.text
    with pytest.raises(AttributeError):
        native_extension().task_starter(object(), asyncio.Task)  # no get_task_factory


def test_a_loop_whose_create_task_is_its_own_keeps_it():
    """A loop subclass (an app's loop policy) or an instance with its own create_task():
    the engine calls it for every request's task, looked up at each call, as uvicorn does."""
    native_extension()
    sys.path.insert(0, SHIM_DIR)
    from molt_shim.engines.asgi_cycle import task_starter

    called = []

    class OwnLoop(asyncio.SelectorEventLoop):
        def create_task(self, coro, **kwargs):
            called.append(coro)
            return super().create_task(coro, **kwargs)

    async def noop():
        return 3

    for loop in (OwnLoop(), asyncio.new_event_loop()):
        start = task_starter(loop)
        if type(loop) is OwnLoop:
            assert type(start).__name__ != "TaskStarter"
        else:
            assert type(start).__name__ == "TaskStarter"
            loop.create_task = lambda coro, **kwargs: called.append(coro) or asyncio.Task(
                coro, loop=loop)
            start = task_starter(loop)
            assert type(start).__name__ != "TaskStarter"
        coroutine = noop()
        assert loop.run_until_complete(start(coroutine)) == 3
        assert called[-1] is coroutine
        loop.close()
