// Loads a listener's certificate files with OpenSSL the way a worker will, so that an unreadable
// file, a key that does not match the certificate or a bad client CA is a config error (at
// `molt check`, and at a HUP, which then keeps the old generation) instead of a worker that
// cannot start.
#pragma once

#include <string>

namespace molt::config {

// "" when the files load; otherwise one line saying which file failed and OpenSSL's reason.
std::string check_tls_files(const std::string& cert, const std::string& key,
                            const std::string& client_ca);

}  // namespace molt::config
