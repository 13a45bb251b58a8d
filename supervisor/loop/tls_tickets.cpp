// The TLS session-ticket keys of each generation (MOLT_TLS_TICKET_KEYS). A client that resumes
// its TLS session presents a ticket the server encrypted with its ticket key; each worker made
// its own random key, so with n workers and connections spread over them a resumption
// succeeded about once in n. The master makes one random key per generation and gives it to
// the generation's zygote and workers: every worker of a generation resumes every session it
// issued. A new generation gets a new key (its workers resume only its own tickets), so a key
// lives no longer than a release; it never reaches the app's environment (the shim removes it).
#include <sys/random.h>

#include <cerrno>
#include <cstring>

#include "supervisor/loop/master.hpp"

namespace molt::loop {

namespace {

// OpenSSL's SSL_CTX_set_tlsext_ticket_keys: 16 bytes of key name, 32 of HMAC secret and 32
// of AES key (the shim checks the same length, config.TICKET_KEY_BYTES).
constexpr std::size_t kTicketKeyBytes = 80;

}  // namespace

bool Master::generation_exists(core::GenerationId generation) const {
    // Not starting, live or draining, and no worker of it left (a failed generation's workers
    // may still be stopping).
    if (auto it = core_.generations().find(generation); it != core_.generations().end()) {
        auto state = it->second.state;
        if (state == core::GenerationState::starting || state == core::GenerationState::live ||
            state == core::GenerationState::draining) {
            return true;
        }
    }
    for (const auto& [worker_id, worker] : core_.workers()) {
        if (worker.generation == generation) return true;
    }
    return false;
}

std::string Master::tls_ticket_keys(const config::Config& config, core::GenerationId generation) {
    bool tls = false;
    for (const auto& address : config.listen) tls = tls || address.tls.enabled();
    if (!tls) return {};
    for (auto it = tls_ticket_keys_.begin(); it != tls_ticket_keys_.end();) {
        it = it->first != generation && !generation_exists(it->first) ? tls_ticket_keys_.erase(it)
                                                                      : std::next(it);
    }
    if (auto it = tls_ticket_keys_.find(generation); it != tls_ticket_keys_.end()) {
        return it->second;
    }
    unsigned char key[kTicketKeyBytes];
    std::size_t got = 0;
    while (got < sizeof key) {
        ssize_t n = ::getrandom(key + got, sizeof key - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            // Each worker then makes its own key, as before: resumption on the same worker only.
            log().warning(std::string("TLS session tickets: getrandom() failed: ") +
                          std::strerror(errno) + "; each worker uses a key of its own");
            return {};
        }
        got += static_cast<std::size_t>(n);
    }
    static const char kHex[] = "0123456789abcdef";
    std::string hex;
    for (unsigned char byte : key) {
        hex += kHex[byte >> 4];
        hex += kHex[byte & 15];
    }
    ::explicit_bzero(key, sizeof key);
    return tls_ticket_keys_[generation] = hex;
}

}  // namespace molt::loop
