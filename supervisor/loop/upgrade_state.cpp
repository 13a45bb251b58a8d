#include "supervisor/loop/upgrade_state.hpp"

#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>

namespace molt::loop {

namespace {

using json = nlohmann::json;

// The core's enums count up from 0 and to_string() answers "?" past their last value, so the
// names a binary knows are found without a second list of them to keep in step.
template <typename Enum>
std::vector<std::string_view> names_of() {
    std::vector<std::string_view> names;
    for (int i = 0;; ++i) {
        std::string_view name = core::to_string(static_cast<Enum>(i));
        if (name == "?") return names;
        names.push_back(name);
    }
}

// Reads fields of the state's JSON, remembering the first problem; after one, every read
// answers a default value and the caller reports `problem`.
class Reader {
  public:
    std::string problem;

    const json& field(const json& object, const char* name, json::value_t type) {
        static const json missing;
        if (!problem.empty()) return missing;
        if (!object.is_object()) return fail("has an entry that is not an object");
        if (!object.contains(name)) return fail(fmt::format("lacks \"{}\"", name));
        const json& value = object[name];
        bool fits = type == json::value_t::number_integer ? value.is_number_integer()
                                                          : value.type() == type;
        if (!fits) return fail(fmt::format("has a wrong type for \"{}\"", name));
        return value;
    }

    template <typename Int>
    Int integer(const json& object, const char* name) {
        const json& value = field(object, name, json::value_t::number_integer);
        return value.is_number_integer() ? value.get<Int>() : Int{};
    }
    std::string string(const json& object, const char* name) {
        const json& value = field(object, name, json::value_t::string);
        return value.is_string() ? value.get<std::string>() : std::string();
    }
    bool boolean(const json& object, const char* name) {
        const json& value = field(object, name, json::value_t::boolean);
        return value.is_boolean() && value.get<bool>();
    }
    const json& array(const json& object, const char* name) {
        static const json empty = json::array();
        const json& value = field(object, name, json::value_t::array);
        return value.is_array() ? value : empty;
    }
    const json& object(const json& object, const char* name) {
        static const json empty = json::object();
        const json& value = field(object, name, json::value_t::object);
        return value.is_object() ? value : empty;
    }

    // An enum stored by name; `what` names the enum in the problem text.
    template <typename Enum>
    Enum named(std::string_view name, const char* what) {
        auto names = names_of<Enum>();
        for (std::size_t i = 0; i < names.size(); ++i) {
            if (names[i] == name) return static_cast<Enum>(i);
        }
        if (problem.empty()) {
            problem = fmt::format("has an unknown {} \"{}\" (this molt knows {})", what, name,
                                  fmt::join(names, ", "));
        }
        return Enum{};
    }
    template <typename Enum>
    Enum named(const json& object, const char* name, const char* what) {
        std::string text = string(object, name);
        return problem.empty() ? named<Enum>(text, what) : Enum{};
    }

  private:
    const json& fail(std::string text) {
        static const json missing;
        if (problem.empty()) problem = std::move(text);
        return missing;
    }
};

json release_json(const core::Release& release) {
    return json{{"release_dir", release.release_dir},
                {"version", release.version},
                {"digest", release.digest}};
}

core::Release read_release(Reader& read, const json& object) {
    core::Release release;
    release.release_dir = read.string(object, "release_dir");
    release.version = read.string(object, "version");
    release.digest = read.string(object, "digest");
    return release;
}

}  // namespace

std::string serialise_upgrade_state(const UpgradeState& state) {
    json listeners = json::array();
    for (const auto& l : state.listeners) {
        listeners.push_back(json{{"fd", l.fd},
                                 {"text", l.address.text},
                                 {"name", l.address.name},
                                 {"path", l.address.path},
                                 {"bound", l.bound},
                                 {"from_systemd", l.from_systemd},
                                 {"remove_on_exit", l.remove_on_exit}});
    }
    json workers = json::array();
    for (const auto& w : state.workers) {
        workers.push_back(json{{"pid", w.worker.pid},
                               {"slot", w.worker.slot},
                               {"channel_fd", w.channel_fd},
                               {"out_fd", w.out_fd},
                               {"err_fd", w.err_fd},
                               {"requests", w.worker.counters.requests},
                               {"rss", w.worker.counters.rss},
                               {"forked", w.worker.forked}});
    }
    json zygote = nullptr;
    if (state.zygote) {
        zygote = json{{"pid", state.zygote->worker.pid},
                      {"channel_fd", state.zygote->channel_fd},
                      {"out_fd", state.zygote->out_fd},
                      {"err_fd", state.zygote->err_fd},
                      {"spare_pid", state.zygote_spare}};
    }
    const core::AdoptedState& adopted = state.adopted;
    json history = json::array();
    for (const auto& h : adopted.history) {
        json entry = release_json({nullptr, h.release_dir, h.version, h.digest});
        entry.update(json{{"id", h.id},
                          {"trigger", core::to_string(h.trigger)},
                          {"started_at", h.started_at.count()},
                          {"live_at", h.live_at ? json(h.live_at->count()) : json(nullptr)},
                          {"state", core::to_string(h.state)},
                          {"failure", h.failure}});
        history.push_back(std::move(entry));
    }
    json restarts = json::object();
    for (const auto& [reason, n] : adopted.restarts) restarts[core::to_string(reason)] = n;
    json generation = release_json(adopted.release);
    generation.update(json{{"id", adopted.generation},
                           {"trigger", core::to_string(adopted.trigger)},
                           {"target", adopted.target}});
    json document{{"format", kUpgradeStateFormat},
                  {"from_build", state.from_build},
                  {"started_at", state.started_at},
                  {"wall_started_at", state.wall_started_at},
                  {"listeners", listeners},
                  {"generation", generation},
                  {"workers", workers},
                  {"zygote", zygote},
                  {"zygote_fallback", state.zygote_fallback},
                  {"accept_board_fd", state.accept_board_fd},
                  {"history", history},
                  {"restarts", restarts},
                  {"rollovers_ok", adopted.rollovers_ok},
                  {"rollovers_failed", adopted.rollovers_failed},
                  {"retired_requests", state.retired_requests},
                  {"next_ticket", state.next_ticket}};
    return document.dump(-1, ' ', false, json::error_handler_t::replace);
}

os::Result<UpgradeState> parse_upgrade_state(const std::string& text) {
    json document = json::parse(text, nullptr, false);
    if (document.is_discarded() || !document.is_object()) {
        return os::Error{"is not a JSON object"};
    }
    if (!document.contains("format")) {
        return os::Error{fmt::format(
            "has no \"format\": it comes from a molt that stored states by number; this molt "
            "reads format {} (restart the service to move to this build)",
            kUpgradeStateFormat)};
    }
    Reader read;
    int format = read.integer<int>(document, "format");
    if (read.problem.empty() && format != kUpgradeStateFormat) {
        return os::Error{
            fmt::format("is format {}; this molt reads format {}", format, kUpgradeStateFormat)};
    }
    UpgradeState state;
    state.from_build = read.string(document, "from_build");
    state.started_at = read.integer<std::int64_t>(document, "started_at");
    state.wall_started_at = read.integer<std::uint64_t>(document, "wall_started_at");
    state.retired_requests = read.integer<std::uint64_t>(document, "retired_requests");
    state.next_ticket = read.integer<core::Ticket>(document, "next_ticket");
    for (const auto& l : read.array(document, "listeners")) {
        HandedOverListener listener;
        listener.fd = read.integer<int>(l, "fd");
        listener.address.text = read.string(l, "text");
        listener.address.name = read.string(l, "name");
        listener.address.path = read.string(l, "path");
        listener.address.kind = listener.address.path.empty()
                                    ? config::ListenAddress::Kind::tcp
                                    : config::ListenAddress::Kind::unix_path;
        listener.bound = read.string(l, "bound");
        listener.from_systemd = read.boolean(l, "from_systemd");
        listener.remove_on_exit = read.boolean(l, "remove_on_exit");
        state.listeners.push_back(std::move(listener));
    }
    for (const auto& w : read.array(document, "workers")) {
        HandedOverWorker worker;
        worker.worker.pid = read.integer<core::Pid>(w, "pid");
        worker.worker.slot = read.integer<int>(w, "slot");
        worker.channel_fd = read.integer<int>(w, "channel_fd");
        worker.out_fd = read.integer<int>(w, "out_fd");
        worker.err_fd = read.integer<int>(w, "err_fd");
        worker.worker.counters.requests = read.integer<std::uint64_t>(w, "requests");
        worker.worker.counters.rss = read.integer<std::uint64_t>(w, "rss");
        if (w.is_object() && w.contains("forked")) worker.worker.forked = read.boolean(w, "forked");
        state.workers.push_back(worker);
    }
    // Optional (a build without the zygote wrote neither).
    if (document.contains("zygote") && !document["zygote"].is_null()) {
        const json& z = read.object(document, "zygote");
        HandedOverWorker zygote;
        zygote.worker.pid = read.integer<core::Pid>(z, "pid");
        zygote.worker.slot = -1;
        zygote.channel_fd = read.integer<int>(z, "channel_fd");
        zygote.out_fd = read.integer<int>(z, "out_fd");
        zygote.err_fd = read.integer<int>(z, "err_fd");
        state.zygote = zygote;
        if (z.contains("spare_pid")) state.zygote_spare = read.integer<core::Pid>(z, "spare_pid");
    }
    if (document.contains("zygote_fallback")) {
        state.zygote_fallback = read.string(document, "zygote_fallback");
    }
    if (document.contains("accept_board_fd")) {
        state.accept_board_fd = read.integer<int>(document, "accept_board_fd");
    }
    core::AdoptedState& adopted = state.adopted;
    const json& generation = read.object(document, "generation");
    adopted.generation = read.integer<core::GenerationId>(generation, "id");
    adopted.release = read_release(read, generation);
    adopted.trigger = read.named<core::Trigger>(generation, "trigger", "trigger");
    adopted.target = read.integer<int>(generation, "target");
    for (const auto& h : read.array(document, "history")) {
        core::HistoryEntry entry;
        entry.id = read.integer<core::GenerationId>(h, "id");
        core::Release release = read_release(read, h);
        entry.release_dir = release.release_dir;
        entry.version = release.version;
        entry.digest = release.digest;
        entry.trigger = read.named<core::Trigger>(h, "trigger", "trigger");
        entry.started_at = core::Time(read.integer<std::int64_t>(h, "started_at"));
        if (h.is_object() && h.contains("live_at") && !h["live_at"].is_null()) {
            entry.live_at = core::Time(read.integer<std::int64_t>(h, "live_at"));
        }
        entry.state = read.named<core::GenerationState>(h, "state", "generation state");
        entry.failure = read.string(h, "failure");
        adopted.history.push_back(std::move(entry));
    }
    for (const auto& [reason, n] : read.object(document, "restarts").items()) {
        auto parsed = read.named<core::RestartReason>(reason, "restart reason");
        if (n.is_number_unsigned()) {
            adopted.restarts[parsed] = n.get<std::uint64_t>();
        } else if (read.problem.empty()) {
            read.problem = fmt::format("has a wrong type for restarts \"{}\"", reason);
        }
    }
    adopted.rollovers_ok = read.integer<std::uint64_t>(document, "rollovers_ok");
    adopted.rollovers_failed = read.integer<std::uint64_t>(document, "rollovers_failed");
    if (!read.problem.empty()) return os::Error{read.problem};
    return state;
}

}  // namespace molt::loop
