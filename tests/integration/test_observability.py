"""What an operator's dashboard and logs see: the request metrics aggregated by the master
from the workers' heartbeats (parsed with prometheus_client's own parser), busy workers
against capacity, the listen queue, the access log (JSON, header placeholders, a file
reopened on SIGUSR1) and the warm-up request (its Host, not logged, not counted)."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path

import pytest

from molt_testlib import APPS, all_threads_stopped, http_get, wait_until

# Heartbeats every 500 ms (timeouts.heartbeat / 6), so the master's view moves quickly.
BASE = {"chdir": str(APPS), "timeouts": {"heartbeat": "3s"}, "health": {"path": "/healthz"}}
ENGINES = {
    "python": {"app": "observe_app:application", "engine": "python"},
    "native": {"app": "observe_app:application", "engine": "native"},
    "asgi": {"app": "observe_app:asgi", "interface": "asgi"},
}
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def native_built() -> bool:
    root = Path(os.environ.get("MOLT_BIN", "build/bin/molt")).resolve().parent.parent
    return any((root / "lib" / "molt").glob("_molt_native*.so"))


def scrape(port: int) -> dict:
    """Every sample, keyed by name and sorted labels, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = http_get(port, "/metrics")
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels) -> float:
    """Sum over the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def request_counts(samples: dict, interface: str) -> dict:
    counts = {cls: value(samples, "molt_responses_total", interface=interface, status_class=cls)
              for cls in CLASSES}
    counts["exceptions"] = value(samples, "molt_app_exceptions_total", interface=interface)
    for cls in CLASSES:
        counts["hist_" + cls] = value(samples, "molt_request_duration_seconds_count",
                                      interface=interface, status_class=cls)
        counts["inf_" + cls] = value(samples, "molt_request_duration_seconds_bucket",
                                     interface=interface, status_class=cls, le="+Inf")
    return counts


def start(molt, engine: str, **extra):
    if engine == "native" and not native_built():
        pytest.skip("the native engine is not built")
    metrics_port = free_port()
    config = dict(BASE, **ENGINES[engine], workers=2, threads=4,
                  metrics={"listen": f"tcp://127.0.0.1:{metrics_port}"})
    config.update(extra)
    return molt(config), metrics_port


@pytest.mark.parametrize("engine", list(ENGINES))
def test_histogram_and_status_classes_move_by_exactly_the_requests_sent(molt, engine):
    m, port = start(molt, engine)
    interface = "asgi" if engine == "asgi" else "wsgi"
    before = request_counts(scrape(port), interface)
    # The warm-up requests (one per worker) are not user traffic: nothing was counted.
    assert all(v == 0 for v in before.values()), before

    sent = {"/ok": 7, "/missing": 3, "/fail": 2, "/raise": 4}
    for path, n in sent.items():
        for _ in range(n):
            http_get(m.port, path)
    expected = {"2xx": 7, "4xx": 3, "5xx": 6, "exceptions": 4}

    def moved(samples):
        counts = request_counts(samples, interface)
        return all(counts[k] == v for k, v in expected.items()) and all(
            counts["hist_" + c] == counts[c] == counts["inf_" + c] for c in CLASSES)

    wait_until(lambda: moved(scrape(port)), 15, "the heartbeats to carry every request")
    samples = scrape(port)
    counts = request_counts(samples, interface)
    assert counts["1xx"] == counts["3xx"] == 0
    # Buckets are cumulative and end at the count; the sum is the durations' total.
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in samples.items()
                     if n == "molt_request_duration_seconds_bucket"
                     and dict(ls)["status_class"] == "2xx" and dict(ls)["interface"] == interface)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1] == (float("inf"), 7)
    assert 0 < value(samples, "molt_request_duration_seconds_sum", interface=interface,
                     status_class="2xx") < 7 * 5
    # Per worker: the requests of both workers add up to all of them.
    assert total(samples, "molt_worker_requests_total") == 16

    # A rollover replaces every worker: the totals keep what the old ones counted.
    assert m.reload()["ok"]
    wait_until(lambda: len(m.workers()) == 2, 15, "the old generation to be gone")
    after = request_counts(scrape(port), interface)
    assert all(after[k] == v for k, v in expected.items()), after
    http_get(m.port, "/ok")
    wait_until(lambda: request_counts(scrape(port), interface)["2xx"] == 8, 15, "one more 2xx")


@pytest.mark.parametrize("engine", ["python", "asgi"])
def test_busy_workers_against_capacity_while_requests_block(molt, engine, tmp_path):
    gate = tmp_path / "gate"
    m, port = start(molt, engine, env={"OBSERVE_GATE": str(gate)},
                    asgi={"limit_concurrency": 10})
    capacity = 10 if engine == "asgi" else 4
    assert total(scrape(port), "molt_worker_capacity") == 2 * capacity
    results = []
    clients = [threading.Thread(target=lambda: results.append(http_get(m.port, "/block",
                                                                       timeout=40)[0]))
               for _ in range(3)]
    try:
        for c in clients:
            c.start()
        wait_until(lambda: total(scrape(port), "molt_worker_busy") == 3, 15,
                   "three busy request slots")
    finally:
        gate.touch()
        for c in clients:
            c.join(40)
    assert results == [200, 200, 200]
    wait_until(lambda: total(scrape(port), "molt_worker_busy") == 0, 15, "idle workers again")


def test_listen_queue_depth_rises_while_the_workers_are_stopped(molt, tmp_path):
    sock_path = tmp_path / "app.sock"
    # Stopped workers stay silent: a heartbeat timeout longer than the test keeps the master
    # from killing them (and their replacements from taking the queue) on a slow machine.
    m, port = start(molt, "python", timeouts={"heartbeat": "120s"},
                    listen=["tcp://127.0.0.1:0", f"unix:{sock_path}"])
    tcp_label = next(a for a in m.status()["master"]["listen"] if a.startswith("tcp://"))
    unix_label = next(a for a in m.status()["master"]["listen"] if a.startswith("unix:"))
    samples = scrape(port)
    assert value(samples, "molt_listen_queue_depth", listener=tcp_label) == 0
    assert value(samples, "molt_listen_queue_limit", listener=tcp_label) > 0
    assert value(samples, "molt_listen_queue_limit", listener=unix_label) > 0

    pids = m.worker_pids()
    waiting = []
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(all_threads_stopped(pid) for pid in pids), 10, "stopped workers")
        for _ in range(5):  # the kernel completes the handshake; nobody accepts
            waiting.append(socket.create_connection(("127.0.0.1", m.port), timeout=5))
        for _ in range(3):
            u = socket.socket(socket.AF_UNIX)
            u.connect(str(sock_path))
            waiting.append(u)
        wait_until(lambda: value(scrape(port), "molt_listen_queue_depth", listener=tcp_label)
                   == 5, 10, "five queued TCP connections")
        assert value(scrape(port), "molt_listen_queue_depth", listener=unix_label) == 3
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_until(lambda: value(scrape(port), "molt_listen_queue_depth", listener=tcp_label) == 0
               and value(scrape(port), "molt_listen_queue_depth", listener=unix_label) == 0,
               15, "the workers to take the queued connections")
    for s in waiting:
        s.close()


def test_rollover_phase_durations(molt):
    m, port = start(molt, "python")
    samples = scrape(port)
    assert value(samples, "molt_generation_phase_seconds", generation="1", phase="boot") > 0
    assert value(samples, "molt_last_generation_phase_seconds", phase="boot") > 0
    assert m.reload()["ok"]
    wait_until(lambda: value(scrape(port), "molt_last_generation_phase_seconds", phase="drain")
               > 0, 15, "the old generation's drain to finish")
    samples = scrape(port)
    assert value(samples, "molt_last_generation_phase_seconds", phase="live") > 0
    assert value(samples, "molt_generation_phase_seconds", generation="2", phase="live") > 0


# ----- the access log --------------------------------------------------------------------------

def access_records(log: str) -> list:
    out = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "access":
            out.append(record)
    return out


@pytest.mark.parametrize("engine", list(ENGINES))
def test_json_access_lines_have_every_field_and_no_warmup(molt, engine):
    if engine == "native" and not native_built():
        pytest.skip("the native engine is not built")
    fmt = "{request_header[x-request-id]} {response_header[x-served-path]} {user_agent}"
    m = molt(dict(BASE, **ENGINES[engine], workers=1,
                  logging={"format": "json", "access_log": True, "access_log_format": fmt}))
    status, _, _ = http_get(m.port, "/missing?x=1",
                            headers={"X-Request-ID": "req-42", "User-Agent": "observer/1"})
    assert status == 404
    wait_until(lambda: access_records(m.log()), 10, "an access line")
    records = access_records(m.log())
    assert len(records) == 1, records  # the warm-up request is not logged
    r = records[0]
    assert r["source"] == "worker" and r["gen"] == 1 and r["worker"] == 0 and r["pid"] > 0
    assert r["method"] == "GET" and r["path"] == "/missing" and r["query"] == "x=1"
    assert r["status"] == 404 and r["protocol"] == "HTTP/1.1" and r["bytes"] == len("/missing")
    assert r["duration_ms"] >= 0 and r["remote"].startswith("127.0.0.1:")
    assert r["request_headers"] == {"x-request-id": "req-42", "user-agent": "observer/1"}
    assert r["response_headers"] == {"x-served-path": "/missing"}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_text_access_lines_with_header_placeholders(molt, engine):
    if engine == "native" and not native_built():
        pytest.skip("the native engine is not built")
    fmt = "ACCESS {status} rid={request_header[x-request-id]} ct={response_header[content-type]}" \
          " absent={request_header[x-absent]}"
    m = molt(dict(BASE, **ENGINES[engine], workers=1,
                  logging={"access_log": True, "access_log_format": fmt}))
    http_get(m.port, "/ok", headers={"X-Request-ID": "abc-1"})
    wait_until(lambda: "ACCESS 200" in m.log(), 10, "the access line")
    assert "ACCESS 200 rid=abc-1 ct=text/plain absent=-" in m.log()
    assert m.log().count("ACCESS ") == 1  # not the warm-up


def test_access_log_file_is_reopened_on_sigusr1(molt, tmp_path):
    path = tmp_path / "access.log"
    m = molt(dict(BASE, **ENGINES["python"], workers=2,
                  logging={"access_log_file": str(path),
                           "access_log_format": "{path} {status}"}))
    http_get(m.port, "/ok")
    wait_until(lambda: path.exists() and "/ok 200" in path.read_text(), 10, "the first line")
    assert "/healthz" not in path.read_text()  # warm-up requests are not logged
    assert "/ok 200" not in m.log()  # the file, not the master's log
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)
    m.signal(signal.SIGUSR1)
    # Until the workers reopened, lines still land in the renamed file: send until one
    # reaches the new file (bounded), and check nothing was lost.
    sent = 1
    def reopened():
        nonlocal sent
        http_get(m.port, "/missing")
        sent += 1
        return path.exists() and "/missing 404" in path.read_text()
    wait_until(reopened, 15, "a line in the new file")
    wait_until(lambda: len(rotated.read_text().splitlines() + path.read_text().splitlines())
               == sent, 10, "every line in one of the two files")


def test_warmup_uses_health_host_and_headers(molt, tmp_path):
    seen = tmp_path / "warmups"
    m = molt(dict(BASE, **ENGINES["python"], workers=2, env={"OBSERVE_WARMUPS": str(seen)},
                  health={"path": "/healthz", "host": "app.example",
                          "headers": {"X-Warmup-Token": "t0k"}}))
    assert seen.read_text().splitlines() == ["app.example t0k"] * 2
    del m


def test_health_host_reaches_a_django_style_host_check_under_asgi(molt, tmp_path):
    seen = tmp_path / "warmups"
    molt(dict(BASE, **ENGINES["asgi"], workers=1, env={"OBSERVE_WARMUPS": str(seen)},
              health={"path": "/healthz", "host": "asgi.example"}))
    assert seen.read_text().splitlines() == ["asgi.example -"]


def test_the_three_copies_of_the_buckets_agree(molt):
    """The master sums bucket by bucket: its bounds, the Python engines' and the native
    engine's must be the same list."""
    import re
    import sys

    from molt_testlib import REPO

    sys.path.insert(0, str(REPO / "worker_shim"))
    from molt_shim.request_metrics import BUCKETS_S

    _, port = start(molt, "python")
    master = sorted({float(dict(ls)["le"]) for (n, ls) in scrape(port)
                     if n == "molt_request_duration_seconds_bucket"})
    assert master == list(BUCKETS_S) + [float("inf")]
    native = (REPO / "worker_shim" / "native" / "engine.hpp").read_text()
    listed = re.search(r"kDurationBuckets\[\] = \{([^}]*)\}", native).group(1)
    assert [float(x) for x in listed.replace("\n", " ").split(",")] == list(BUCKETS_S)


# ----- the app's own metrics (metrics.app_multiprocess) ----------------------------------------

def app_metrics_dirs(root: Path) -> list[str]:
    """The generation directories under the master's one directory (there is one at most)."""
    masters = list(root.glob("molt-app-metrics.*"))
    assert len(masters) <= 1, masters
    return sorted(p.name for p in masters[0].iterdir()) if masters else []


def test_prometheus_client_multiprocess_app_across_rollovers_and_a_kill(molt, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics_port = free_port()
    config = dict(BASE, app="multiproc_metrics_app:app", workers=2,
                  metrics={"listen": f"tcp://127.0.0.1:{metrics_port}", "app_multiprocess": True})
    m = molt(config, env=dict(os.environ, RUNTIME_DIRECTORY=str(run_dir)))

    def hits(samples):
        return value(samples, "app_hits_total")

    for rollover in range(6):
        generation = m.live_generation()
        # Only the live generation's directory is left: the old one went with its workers.
        wait_until(lambda: app_metrics_dirs(run_dir) == [f"generation-{generation}"], 15,
                   "the old generation's directory to be removed")
        samples = scrape(metrics_port)
        assert hits(samples) == 0, samples  # a new generation counts from zero
        assert any(n.startswith("molt_") for n, _ in samples), samples
        sent = 3 + rollover
        for _ in range(sent):
            assert http_get(m.port, "/hit")[0] == 200
        samples = scrape(metrics_port)
        assert hits(samples) == sent, samples
        assert any(n == "molt_worker_requests_total" for n, _ in samples), samples
        if rollover < 5:
            assert m.reload()["ok"]

    # kill -9 of a worker: its counts stay (they were served), its live gauge goes.
    victim = m.worker_pids()[0]
    gen_dir = next(run_dir.glob("molt-app-metrics.*")) / f"generation-{m.live_generation()}"
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in m.worker_pids() and len(m.worker_pids()) == 2, 30,
               "the killed worker to be replaced")
    wait_until(lambda: not list(gen_dir.glob(f"gauge_live*_{victim}.db")), 15,
               "the dead worker to be marked dead")
    samples = scrape(metrics_port)
    assert hits(samples) == sent
    serving = value(samples, "app_serving_processes")
    assert serving == len([p for p in m.worker_pids()
                           if list(gen_dir.glob(f"gauge_live*_{p}.db"))]), samples

    # At exit nothing is left.
    assert m.stop() == 0
    assert list(run_dir.iterdir()) == []


def test_a_recycled_workers_slot_is_one_series_while_its_replacement_boots(molt, tmp_path):
    # The old worker and its replacement share the slot until the replacement is ready: two
    # series with the same labels, which fails a Prometheus scrape.
    app = tmp_path / "slow_boot_app.py"
    app.write_text("import time\ntime.sleep(4)\n\n\n"
                   "def application(environ, start_response):\n"
                   "    start_response('200 OK', [])\n    return [b'ok']\n")
    metrics_port = free_port()
    m = molt(dict(BASE, app="slow_boot_app:application", chdir=str(tmp_path), workers=1,
                  preload=False, recycle={"max_requests": 2}, health=None,
                  metrics={"listen": f"tcp://127.0.0.1:{metrics_port}"}))
    for _ in range(2):
        assert http_get(m.port, "/")[0] == 200
    wait_until(lambda: len(m.status()["generations"][0]["workers"]) == 2, 10,
               "the replacement booting beside the old worker", on_timeout=m.log)
    status, _, body = http_get(metrics_port, "/metrics")
    series = [line.rsplit(" ", 1)[0] for line in body.decode().splitlines()
              if line and not line.startswith("#")]
    twice = sorted({s for s in series if series.count(s) > 1})
    assert not twice, twice
    scrape(metrics_port)  # and prometheus_client's parser takes it
    # The scrape was taken while both shared the slot (else it proved nothing).
    assert len(m.status()["generations"][0]["workers"]) == 2, m.status()
