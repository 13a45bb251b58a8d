"""The report's charts (docs/bench-*.png), drawn with matplotlib when it is there."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing to files, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def label_bars(ax, bars, values: list, texts: list[str], fontsize: int):
    """Each bar's value written just above it."""
    for b, v, text in zip(bars, values, texts):
        ax.text(b.get_x() + b.get_width() / 2, v, text, ha="center", va="bottom",
                fontsize=fontsize)


def paired_bars(ax, labels: list[str], left: tuple, right: tuple) -> tuple:
    """Two bars per server side by side; `left` and `right` are (values, legend, colour)."""
    x = range(len(labels))
    bars = tuple(ax.bar([i + shift for i in x], values, 0.4, label=name, color=color)
                 for shift, (values, name, color) in ((-0.2, left), (0.2, right)))
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    return bars


def save(plt, fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def chart_throughput(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    groups = [(k, t) for k, t in [("wsgi_keepalive", "WSGI keep-alive"),
                                  ("wsgi_close", "WSGI Connection: close"),
                                  ("asgi_keepalive", "ASGI keep-alive"),
                                  ("asgi_close", "ASGI Connection: close")] if k in results]
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 4))
    if len(groups) == 1:
        axes = [axes]
    colors = {"molt": "#2a7", "gunicorn-gthread": "#c84", "gunicorn-sync": "#e9a",
              "uwsgi": "#58c", "uvicorn": "#a6c", "gunicorn-uvicorn": "#c9e"}
    for ax, (key, title) in zip(axes, groups):
        labels = list(results[key])
        values = [results[key][l]["rps"] for l in labels]
        bars = ax.bar(range(len(labels)), values, color=[colors.get(l, "#888") for l in labels])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([l.replace("gunicorn-", "gunicorn\n") for l in labels], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("requests/s (median)")
        label_bars(ax, bars, values, [f"{v:,.0f}" for v in values], 7)
    fig.suptitle("Hello world, 4 workers, wrk -t2 -c64 (same run, same machine)", fontsize=10)
    return save(plt, fig, path)


def chart_rollover(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    if "rollover" not in results:
        return False
    labels = list(results["rollover"])
    steady = [results["steady"][l]["p99"] for l in labels]
    during = [results["rollover"][l]["p99"] for l in labels]
    failed = [results["rollover"][l]["socket_errors"] + results["rollover"][l]["non2xx"]
              for l in labels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
    paired_bars(ax1, labels, (steady, "steady", "#8bc"), (during, "during rollovers", "#c64"))
    ax1.set_ylabel("p99 latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title("p99 latency, wrk -c32 keep-alive", fontsize=10)
    x = list(range(len(labels)))
    shown = [max(f, 0.5) for f in failed]     # a log scale has no 0
    bars = ax2.bar(x, shown, color="#c64")
    ax2.set_yscale("log")
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.set_title("failed requests during the rollovers", fontsize=10)
    label_bars(ax2, bars, shown, [str(f) for f in failed], 8)
    return save(plt, fig, path)


def chart_memory(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    if "memory" not in results:
        return False
    mem = results["memory"]
    labels = list(mem)
    fig, ax = plt.subplots(figsize=(6, 4))
    master = [mem[l]["master_rss_kib"] / 1024 for l in labels]
    worker = [mem[l]["worker_rss_kib_median"] / 1024 for l in labels]
    b1, b2 = paired_bars(ax, labels, (master, "master RSS", "#2a7"),
                         (worker, "one worker RSS (median)", "#58c"))
    for bars, values in ((b1, master), (b2, worker)):
        label_bars(ax, bars, values, [f"{v:.1f}" for v in values], 8)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory, {results['params']['memory_workers']} workers, idle", fontsize=10)
    return save(plt, fig, path)
