// Views of the master's state for people and tools: `molt ctl status`/`history` (JSON) and
// the Prometheus text exposition at /metrics. Read-only; computed on demand.
#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <map>
#include <optional>
#include <string_view>
#include <utility>

#include "supervisor/loop/master.hpp"

namespace molt::loop {

namespace {

using json = nlohmann::json;

std::string label(std::string_view value) {
    // Prometheus label values escape backslash, double quote and newline.
    std::string out;
    for (char c : value) {
        if (c == '\\' || c == '"') out += '\\';
        if (c == '\n') {
            out += "\\n";
            continue;
        }
        out += c;
    }
    return out;
}

constexpr std::array<const char*, 3> kPreloadNames{"auto", "true", "false"};

// Whether a generation's workers are (being) forked from its zygote.
bool preloaded(const core::Generation& gen) {
    return gen.zygote.state == core::ZygoteState::ready || gen.zygote.forks > 0;
}

json zygote_json(const core::Generation& gen, unsigned long long pss, pid_t spare) {
    const core::Zygote& z = gen.zygote;
    json out{{"mode", kPreloadNames[static_cast<std::size_t>(gen.release.config->preload)]},
             {"preloaded", preloaded(gen)},
             {"fallback", z.fallback.empty() ? json(nullptr) : json(z.fallback)},
             {"zygote", nullptr}};
    if (z.state != core::ZygoteState::none && z.state != core::ZygoteState::gone) {
        bool alive = z.pid > 0;
        out["zygote"] = json{{"pid", z.pid},
                             {"state", core::to_string(z.state)},
                             {"forks", z.forks},
                             {"spare_pid", spare > 0 ? json(spare) : json(nullptr)},
                             {"rss_bytes", alive ? os::resident_bytes(z.pid) : 0},
                             {"pss_bytes", pss}};
    }
    return out;
}

void family(std::string& out, const char* name, const char* type, const char* help) {
    out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

double seconds(core::Duration d) {
    return static_cast<double>(d.count()) / 1000.0;
}

// A worker's value for a per-slot series; nothing when it has none.
using Count = std::optional<std::uint64_t>;

// One series per generation and slot. A worker being replaced and its replacement share their
// slot for a moment (a recycle, a kill -9), and two series with the same labels fail the whole
// scrape: the slot's series is the sum of its workers' values (its requests, its memory).
// `value` returns nothing for a worker that has none (no capacity when unlimited).
template <typename Value>
void per_slot(std::string& out, std::string_view name, const core::Supervisor& core, Value value) {
    std::map<std::pair<core::GenerationId, int>, std::uint64_t> slots;
    for (const auto& [id, w] : core.workers()) {
        if (w.pid <= 0) continue;
        if (const Count v = value(w)) slots[{w.generation, w.slot}] += *v;
    }
    for (const auto& [key, v] : slots) {
        out +=
            fmt::format("{}{{generation=\"{}\",slot=\"{}\"}} {}\n", name, key.first, key.second, v);
    }
}

}  // namespace

std::string Master::interface_of(core::GenerationId generation) const {
    auto it = core_.generations().find(generation);
    const config::Config& config = it != core_.generations().end() && it->second.release.config
                                       ? *it->second.release.config
                                       : *config_;
    return config.interface == config::Interface::asgi ? "asgi" : "wsgi";
}

// The request duration histogram, responses by status class and app exceptions: the live
// workers' cumulative counts from their last heartbeats plus those of every worker that has
// exited, per interface.
void Master::request_metrics_text(std::string& out) const {
    std::map<std::string, core::RequestStats> totals = retired_stats_;
    totals[interface_of(core_.live_generation().value_or(0))];  // present from the start
    for (const auto& [id, w] : core_.workers()) {
        totals[interface_of(w.generation)].add(w.counters.stats);
    }
    family(out, "molt_request_duration_seconds", "histogram",
           "Time from a request's first byte to the app's return, by interface and status class.");
    for (const auto& [interface, stats] : totals) {
        for (std::size_t cls = 0; cls < core::kStatusClasses.size(); ++cls) {
            const core::ClassDurations& d = stats.by_class[cls];
            const std::string labels = fmt::format("interface=\"{}\",status_class=\"{}\"",
                                                   interface, core::kStatusClasses[cls]);
            std::uint64_t cumulative = 0;
            for (std::size_t b = 0; b < core::kBucketCount; ++b) {
                cumulative += d.buckets[b];
                std::string le = b < core::kDurationBuckets.size()
                                     ? fmt::format("{}", core::kDurationBuckets[b])
                                     : std::string("+Inf");
                out += fmt::format("molt_request_duration_seconds_bucket{{{},le=\"{}\"}} {}\n",
                                   labels, le, cumulative);
            }
            out += fmt::format("molt_request_duration_seconds_sum{{{}}} {:.6f}\n", labels,
                               static_cast<double>(d.sum_us) / 1e6);
            out +=
                fmt::format("molt_request_duration_seconds_count{{{}}} {}\n", labels, cumulative);
        }
    }
    family(out, "molt_responses_total", "counter", "Responses by interface and status class.");
    for (const auto& [interface, stats] : totals) {
        for (std::size_t cls = 0; cls < core::kStatusClasses.size(); ++cls) {
            out += fmt::format("molt_responses_total{{interface=\"{}\",status_class=\"{}\"}} {}\n",
                               interface, core::kStatusClasses[cls], stats.by_class[cls].count());
        }
    }
    family(out, "molt_app_exceptions_total", "counter",
           "Exceptions the app raised while handling a request (each also got a 500 or a "
           "closed connection).");
    for (const auto& [interface, stats] : totals) {
        out += fmt::format("molt_app_exceptions_total{{interface=\"{}\"}} {}\n", interface,
                           stats.exceptions);
    }
}

// Per worker: requests served, requests running now (busy threads for WSGI) and how many it
// can run at once, so saturation is sum(busy) / sum(capacity).
void Master::worker_load_metrics_text(std::string& out) const {
    using Worker = core::Worker;
    family(out, "molt_worker_requests_total", "counter",
           "Requests served by each worker (from its heartbeats; it starts at 0 with the worker).");
    per_slot(out, "molt_worker_requests_total", core_,
             [](const Worker& w) -> Count { return w.counters.requests; });
    family(out, "molt_worker_busy", "gauge",
           "Requests each worker is running now (its busy threads, for WSGI), from its last "
           "heartbeat.");
    per_slot(out, "molt_worker_busy", core_,
             [](const Worker& w) -> Count { return w.counters.inflight; });
    family(out, "molt_worker_capacity", "gauge",
           "Requests each worker can run at once: `threads` for WSGI, `asgi.limit_concurrency` "
           "for ASGI (absent when unlimited).");
    per_slot(out, "molt_worker_capacity", core_, [this](const Worker& w) -> Count {
        auto gen = core_.generations().find(w.generation);
        if (gen == core_.generations().end() || !gen->second.release.config) return {};
        const config::Config& config = *gen->second.release.config;
        std::uint64_t capacity = config.interface == config::Interface::asgi
                                     ? config.asgi.limit_concurrency
                                     : static_cast<std::uint64_t>(config.threads);
        return capacity == 0 ? Count{} : Count{capacity};
    });
}

// The accept queue of every listener the master holds, read now (one getsockopt or one
// netlink round trip each): connections waiting for a worker, and the backlog limit.
void Master::listen_queue_metrics_text(std::string& out) const {
    std::string depth, limit;
    for (const auto& l : listeners_) {
        auto queue = os::listen_queue(l.fd.get());
        if (!os::ok(queue)) continue;
        const auto& q = std::get<os::ListenQueue>(queue);
        depth +=
            fmt::format("molt_listen_queue_depth{{listener=\"{}\"}} {}\n", label(l.bound), q.depth);
        limit +=
            fmt::format("molt_listen_queue_limit{{listener=\"{}\"}} {}\n", label(l.bound), q.limit);
    }
    family(out, "molt_listen_queue_depth", "gauge",
           "Connections the kernel accepted that no worker has taken yet, per listener.");
    out += depth;
    family(out, "molt_listen_queue_limit", "gauge",
           "The listen backlog: above it the kernel drops or refuses new connections.");
    out += limit;
}

// How long generations spend booting, live and draining: the ones the master holds now
// (phases still running count up to now) and the last completed phase of each kind.
void Master::phase_metrics_text(std::string& out, core::Time now) const {
    family(out, "molt_generation_phase_seconds", "gauge",
           "Per generation held now: seconds from start to live (boot), live to draining "
           "(live), draining to now (drain); a running phase counts up to now.");
    for (const auto& [id, gen] : core_.generations()) {
        auto line = [&](const char* phase, core::Duration d) {
            out += fmt::format(
                "molt_generation_phase_seconds{{generation=\"{}\",phase=\"{}\"}} "
                "{:.3f}\n",
                id, phase, seconds(d));
        };
        line("boot", (gen.live_at ? *gen.live_at : gen.draining_at.value_or(now)) - gen.started_at);
        if (gen.live_at) line("live", gen.draining_at.value_or(now) - *gen.live_at);
        if (gen.draining_at) line("drain", gen.ended_at.value_or(now) - *gen.draining_at);
    }
    family(out, "molt_last_generation_phase_seconds", "gauge",
           "The last completed boot (start to live), live (live to draining) and drain "
           "(draining to gone) of any generation.");
    const core::PhaseDurations& last = core_.last_phases();
    for (auto [phase, d] : {std::pair{"boot", last.boot}, std::pair{"live", last.live},
                            std::pair{"drain", last.drain}}) {
        if (d) {
            out += fmt::format("molt_last_generation_phase_seconds{{phase=\"{}\"}} {:.3f}\n", phase,
                               seconds(*d));
        }
    }
}

json Master::status_json() const {
    auto* self = const_cast<Master*>(this);
    core::Time now = self->now();
    std::uint64_t wall_now =
        wall_started_at_ + static_cast<std::uint64_t>((now - started_at_).count());
    auto wall = [&](core::Time t) {
        return static_cast<double>(wall_now - static_cast<std::uint64_t>((now - t).count())) /
               1000.0;
    };
    json listen = json::array();
    for (const auto& l : listeners_) listen.push_back(l.bound);

    json generations = json::array();
    for (const auto& [id, gen] : core_.generations()) {
        json workers = json::array();
        for (const auto& [wid, w] : core_.workers()) {
            if (w.generation != id) continue;
            auto restarts = gen.slot_restarts.find(w.slot);
            workers.push_back(json{
                {"slot", w.slot},
                {"pid", w.pid},
                {"state", core::to_string(w.state)},
                {"uptime_s", static_cast<double>((now - w.spawned_at).count()) / 1000.0},
                {"requests", w.counters.requests},
                {"inflight", w.counters.inflight},
                {"oldest_ms", w.counters.oldest_ms},
                {"rss_bytes", w.pid > 0 ? os::resident_bytes(w.pid) : 0},
                {"pss_bytes", pss_of(w.pid)},  // sampled (sample_pss)
                {"forked", w.forked},
                {"restarts", restarts == gen.slot_restarts.end() ? 0 : restarts->second},
                {"retiring", w.retiring ? json(core::to_string(*w.retiring)) : json(nullptr)},
            });
        }
        json g{{"id", id},
               {"state", core::to_string(gen.state)},
               {"release_dir", gen.release.release_dir},
               {"version", gen.release.version},
               {"config_digest", gen.release.digest},
               {"trigger", core::to_string(gen.trigger)},
               {"target_workers", gen.target},
               {"started_at", wall(gen.started_at)},
               {"preload", zygote_json(gen, pss_of(gen.zygote.pid), spare_of(gen.zygote.pid))},
               {"workers", workers}};
        if (gen.live_at) {
            g["live_at"] = wall(*gen.live_at);
            g["rollover_ms"] = (*gen.live_at - gen.started_at).count();
        }
        if (!gen.failure.empty()) g["failure"] = gen.failure;
        generations.push_back(g);
    }
    json last = nullptr;
    if (auto r = core_.last_rollover()) {
        last = json{{"ok", r->ok},
                    {"generation", r->generation},
                    {"took_ms", r->took.count()},
                    {"reason", r->reason}};
    }
    auto target = core_.rollback_target();
    return json{
        {"master",
         {{"pid", os::self_pid()},
          {"version", options_.version},
          {"build", options_.build},
          {"executable", options_.executable},
          {"state", core::to_string(core_.state())},
          {"uptime_s", static_cast<double>((now - started_at_).count()) / 1000.0},
          {"config", options_.config_path},
          {"app", config_->app},
          {"listen", listen},
          {"target_workers", core_.target_workers()}}},
        {"live_generation",
         core_.live_generation() ? json(*core_.live_generation()) : json(nullptr)},
        {"rollover_in_progress", core_.rollover_phase() != core::RolloverPhase::idle},
        {"generations", generations},
        {"last_rollover", last},
        {"rollovers", {{"ok", core_.rollovers(true)}, {"failed", core_.rollovers(false)}}},
        {"rollback_target", target ? json(*target) : json(nullptr)},
        // The next zygote-to-be (standby.cpp), forked before its zygote's import.
        {"standby", standby_.pid ? json{{"pid", standby_.pid}, {"pss_bytes", pss_of(standby_.pid)}}
                                 : json(nullptr)},
    };
}

json Master::history_json() const {
    auto* self = const_cast<Master*>(this);
    core::Time now = self->now();
    std::uint64_t wall_now =
        wall_started_at_ + static_cast<std::uint64_t>((now - started_at_).count());
    json entries = json::array();
    for (const auto& entry : core_.history()) {
        json e{{"id", entry.id},
               {"release_dir", entry.release_dir},
               {"version", entry.version},
               {"config_digest", entry.digest},
               {"trigger", core::to_string(entry.trigger)},
               {"state", core::to_string(entry.state)},
               {"started_at",
                static_cast<double>(wall_now -
                                    static_cast<std::uint64_t>((now - entry.started_at).count())) /
                    1000.0}};
        if (entry.live_at) e["rollover_ms"] = (*entry.live_at - entry.started_at).count();
        if (!entry.failure.empty()) e["failure"] = entry.failure;
        entries.push_back(e);
    }
    return entries;
}

std::string Master::metrics_text() const {
    auto* self = const_cast<Master*>(this);
    core::Time now = self->now();
    std::string out;
    auto family = [&](const char* name, const char* type, const char* help) {
        loop::family(out, name, type, help);
    };

    family("molt_build_info", "gauge", "The molt version that runs the master.");
    out += fmt::format("molt_build_info{{version=\"{}\"}} 1\n", label(options_.version));
    family("molt_master_uptime_seconds", "gauge", "Seconds since the master started.");
    out += fmt::format("molt_master_uptime_seconds {:.3f}\n",
                       static_cast<double>((now - started_at_).count()) / 1000.0);
    family("molt_generation", "gauge", "The live generation's id (0 before the first is live).");
    out += fmt::format("molt_generation {}\n", core_.live_generation().value_or(0));
    family("molt_generation_info", "gauge", "Every generation the master holds, with its version.");
    for (const auto& [id, gen] : core_.generations()) {
        out +=
            fmt::format("molt_generation_info{{generation=\"{}\",state=\"{}\",version=\"{}\"}} 1\n",
                        id, core::to_string(gen.state), label(gen.release.version));
    }

    family("molt_workers", "gauge", "Worker processes by generation and state.");
    std::map<std::pair<core::GenerationId, std::string>, int> counts;
    for (const auto& [id, gen] : core_.generations()) {
        for (auto state :
             {core::WorkerState::booting, core::WorkerState::ready, core::WorkerState::draining}) {
            counts[{id, core::to_string(state)}] = 0;
        }
    }
    std::uint64_t requests = retired_requests_;
    std::uint64_t inflight = 0;
    for (const auto& [id, w] : core_.workers()) {
        counts[{w.generation, core::to_string(w.state)}]++;
        requests += w.counters.requests;
        inflight += w.counters.inflight;
    }
    for (const auto& [key, n] : counts) {
        out += fmt::format("molt_workers{{generation=\"{}\",state=\"{}\"}} {}\n", key.first,
                           key.second, n);
    }

    family("molt_rollovers_total", "counter", "Rollovers (reload, rollback) by result.");
    out += fmt::format("molt_rollovers_total{{result=\"ok\"}} {}\n", core_.rollovers(true));
    out += fmt::format("molt_rollovers_total{{result=\"failed\"}} {}\n", core_.rollovers(false));
    family("molt_last_rollover_duration_seconds", "gauge",
           "How long the last rollover took, from its start to live or failed.");
    auto last = core_.last_rollover();
    out += fmt::format("molt_last_rollover_duration_seconds {:.3f}\n",
                       last ? static_cast<double>(last->took.count()) / 1000.0 : 0.0);

    family("molt_worker_restarts_total", "counter", "Workers replaced, by reason.");
    for (auto reason : {core::RestartReason::crash, core::RestartReason::heartbeat,
                        core::RestartReason::request_timeout, core::RestartReason::recycle,
                        core::RestartReason::boot_timeout, core::RestartReason::killed}) {
        auto it = core_.restarts().find(reason);
        out += fmt::format("molt_worker_restarts_total{{reason=\"{}\"}} {}\n",
                           core::to_string(reason), it == core_.restarts().end() ? 0 : it->second);
    }

    family("molt_requests_total", "counter",
           "Requests served by all workers, from their heartbeats.");
    out += fmt::format("molt_requests_total {}\n", requests);
    family("molt_requests_in_flight", "gauge", "Requests in flight, from the last heartbeats.");
    out += fmt::format("molt_requests_in_flight {}\n", inflight);

    request_metrics_text(out);
    worker_load_metrics_text(out);
    listen_queue_metrics_text(out);
    phase_metrics_text(out, now);

    family("molt_worker_resident_memory_bytes", "gauge", "Resident memory of each worker.");
    per_slot(out, "molt_worker_resident_memory_bytes", core_, [](const core::Worker& w) -> Count {
        return static_cast<std::uint64_t>(os::resident_bytes(w.pid));
    });
    family("molt_worker_proportional_memory_bytes", "gauge",
           "Proportional set size of each worker (shared pages divided among their sharers), "
           "sampled from /proc/PID/smaps_rollup every 5 s.");
    per_slot(out, "molt_worker_proportional_memory_bytes", core_,
             [this](const core::Worker& w) -> Count {
                 return static_cast<std::uint64_t>(pss_of(w.pid));
             });
    family("molt_generation_preloaded", "gauge",
           "1 when the generation's workers are forked from its zygote (preload), else 0.");
    for (const auto& [id, gen] : core_.generations()) {
        out += fmt::format("molt_generation_preloaded{{generation=\"{}\"}} {}\n", id,
                           preloaded(gen) ? 1 : 0);
    }
    family("molt_zygote_resident_memory_bytes", "gauge", "Resident memory of each zygote.");
    for (const auto& [id, gen] : core_.generations()) {
        if (gen.zygote.pid <= 0 || !core::Supervisor::zygote_alive(gen.zygote)) continue;
        out += fmt::format("molt_zygote_resident_memory_bytes{{generation=\"{}\",pid=\"{}\"}} {}\n",
                           id, gen.zygote.pid, os::resident_bytes(gen.zygote.pid));
    }
    family("molt_zygote_proportional_memory_bytes", "gauge",
           "Proportional set size of each zygote.");
    for (const auto& [id, gen] : core_.generations()) {
        if (gen.zygote.pid <= 0 || !core::Supervisor::zygote_alive(gen.zygote)) continue;
        out += fmt::format(
            "molt_zygote_proportional_memory_bytes{{generation=\"{}\",pid=\"{}\"}} {}\n", id,
            gen.zygote.pid, pss_of(gen.zygote.pid));
    }
    family("molt_standby_proportional_memory_bytes", "gauge",
           "Proportional set size of the standby (the next zygote, forked before the import); "
           "absent when there is none.");
    if (standby_.pid > 0) {
        out += fmt::format("molt_standby_proportional_memory_bytes{{pid=\"{}\"}} {}\n",
                           standby_.pid, pss_of(standby_.pid));
    }
    family("molt_master_resident_memory_bytes", "gauge", "Resident memory of the master.");
    out += fmt::format("molt_master_resident_memory_bytes {}\n", os::resident_bytes(getpid()));
    return out;
}

}  // namespace molt::loop
