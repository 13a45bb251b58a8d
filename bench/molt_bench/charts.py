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
        for b, v in zip(bars, values):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom",
                    fontsize=7)
    fig.suptitle("Hello world, 4 workers, wrk -t2 -c64 (same run, same machine)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], steady, 0.4, label="steady", color="#8bc")
    ax1.bar([i + 0.2 for i in x], during, 0.4, label="during rollovers", color="#c64")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(labels, fontsize=8)
    ax1.set_ylabel("p99 latency (ms)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title("p99 latency, wrk -c32 keep-alive", fontsize=10)
    bars = ax2.bar(list(x), [max(f, 0.5) for f in failed], color="#c64")
    ax2.set_yscale("log")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(labels, fontsize=8)
    ax2.set_title("failed requests during the rollovers", fontsize=10)
    for b, v in zip(bars, failed):
        ax2.text(b.get_x() + b.get_width() / 2, max(v, 0.5), str(v), ha="center", va="bottom",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def chart_memory(results: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    if "memory" not in results:
        return False
    mem = results["memory"]
    labels = list(mem)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = range(len(labels))
    master = [mem[l]["master_rss_kib"] / 1024 for l in labels]
    worker = [mem[l]["worker_rss_kib_median"] / 1024 for l in labels]
    b1 = ax.bar([i - 0.2 for i in x], master, 0.4, label="master RSS", color="#2a7")
    b2 = ax.bar([i + 0.2 for i in x], worker, 0.4, label="one worker RSS (median)", color="#58c")
    for b, v in list(zip(b1, master)) + list(zip(b2, worker)):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    ax.set_title(f"Memory, {results['params']['memory_workers']} workers, idle", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
