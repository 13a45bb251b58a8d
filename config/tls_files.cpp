#include "config/tls_files.hpp"

#include <dlfcn.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include <memory>

namespace molt::config {

namespace {

// OpenSSL is loaded only when a config has a TLS listener (dlopen, not linked): mapped and
// initialised, libssl and libcrypto are 1.7 MiB of the master's resident memory, which every
// master without TLS would hold for nothing. The declarations come from OpenSSL's own headers
// (decltype), so a signature that changes fails to build instead of failing at run time. The
// library stays loaded once it was (a HUP with TLS would load it again).
struct OpenSsl {
    decltype(&::ERR_get_error) err_get_error = nullptr;
    decltype(&::ERR_error_string_n) err_error_string_n = nullptr;
    decltype(&::ERR_clear_error) err_clear_error = nullptr;
    decltype(&::TLS_server_method) tls_server_method = nullptr;
    decltype(&::SSL_CTX_new) ssl_ctx_new = nullptr;
    decltype(&::SSL_CTX_free) ssl_ctx_free = nullptr;
    decltype(&::SSL_CTX_use_certificate_chain_file) use_certificate_chain_file = nullptr;
    decltype(&::SSL_CTX_use_PrivateKey) use_private_key = nullptr;
    decltype(&::SSL_CTX_check_private_key) check_private_key = nullptr;
    decltype(&::SSL_CTX_load_verify_locations) load_verify_locations = nullptr;
    decltype(&::BIO_new_file) bio_new_file = nullptr;
    decltype(&::BIO_free) bio_free = nullptr;
    decltype(&::PEM_read_bio_PrivateKey) pem_read_bio_private_key = nullptr;
    decltype(&::EVP_PKEY_free) evp_pkey_free = nullptr;
    std::string error;  // why it could not be loaded ("" when it was)
};

template <typename Fn>
bool find(void* library, const char* name, Fn& into, std::string& error) {
    into = reinterpret_cast<Fn>(dlsym(library, name));
    if (into == nullptr && error.empty()) error = std::string("no symbol ") + name;
    return into != nullptr;
}

const OpenSsl& openssl() {
    static const OpenSsl loaded = [] {
        OpenSsl o;
        void* library = dlopen(MOLT_LIBSSL_SONAME, RTLD_NOW | RTLD_LOCAL);
        if (library == nullptr) {
            const char* why = dlerror();
            o.error = std::string("cannot load OpenSSL (" MOLT_LIBSSL_SONAME "): ") +
                      (why != nullptr ? why : "unknown error");
            return o;
        }
        // libcrypto's functions are found through libssl's handle (its dependency).
        find(library, "ERR_get_error", o.err_get_error, o.error);
        find(library, "ERR_error_string_n", o.err_error_string_n, o.error);
        find(library, "ERR_clear_error", o.err_clear_error, o.error);
        find(library, "TLS_server_method", o.tls_server_method, o.error);
        find(library, "SSL_CTX_new", o.ssl_ctx_new, o.error);
        find(library, "SSL_CTX_free", o.ssl_ctx_free, o.error);
        find(library, "SSL_CTX_use_certificate_chain_file", o.use_certificate_chain_file, o.error);
        find(library, "SSL_CTX_use_PrivateKey", o.use_private_key, o.error);
        find(library, "SSL_CTX_check_private_key", o.check_private_key, o.error);
        find(library, "SSL_CTX_load_verify_locations", o.load_verify_locations, o.error);
        find(library, "BIO_new_file", o.bio_new_file, o.error);
        find(library, "BIO_free", o.bio_free, o.error);
        find(library, "PEM_read_bio_PrivateKey", o.pem_read_bio_private_key, o.error);
        find(library, "EVP_PKEY_free", o.evp_pkey_free, o.error);
        if (!o.error.empty()) o.error = "cannot use OpenSSL (" MOLT_LIBSSL_SONAME "): " + o.error;
        return o;
    }();
    return loaded;
}

// OpenSSL's reasons for the last failure, oldest first, and the queue emptied.
std::string openssl_errors(const OpenSsl& ssl) {
    std::string text;
    while (const unsigned long code = ssl.err_get_error()) {
        char buffer[256];
        ssl.err_error_string_n(code, buffer, sizeof buffer);
        if (!text.empty()) text += "; ";
        text += buffer;
    }
    return text.empty() ? "unknown OpenSSL error" : text;
}

// The PEM password callback: never a password. OpenSSL's default asks on the terminal, which
// blocks a master started from one (and a HUP's check) on a key with a passphrase.
int no_passphrase(char*, int, int, void* asked) {
    *static_cast<bool*>(asked) = true;
    return -1;
}

}  // namespace

std::string check_tls_files(const std::string& cert, const std::string& key,
                            const std::string& client_ca) {
    const OpenSsl& ssl = openssl();
    if (!ssl.error.empty()) return ssl.error;
    ssl.err_clear_error();
    std::unique_ptr<SSL_CTX, decltype(ssl.ssl_ctx_free)> ctx(
        ssl.ssl_ctx_new(ssl.tls_server_method()), ssl.ssl_ctx_free);
    if (!ctx) return "cannot create a TLS context: " + openssl_errors(ssl);
    if (ssl.use_certificate_chain_file(ctx.get(), cert.c_str()) != 1) {
        return "cannot load the certificate chain " + cert + ": " + openssl_errors(ssl);
    }
    // Read first, then installed: OpenSSL 3 checks the match while installing, and "cannot
    // read the key" and "the key belongs to another certificate" need different fixes.
    std::unique_ptr<BIO, decltype(ssl.bio_free)> file(ssl.bio_new_file(key.c_str(), "r"),
                                                      ssl.bio_free);
    bool passphrase_asked = false;
    std::unique_ptr<EVP_PKEY, decltype(ssl.evp_pkey_free)> pkey(
        file ? ssl.pem_read_bio_private_key(file.get(), nullptr, no_passphrase, &passphrase_asked)
             : nullptr,
        ssl.evp_pkey_free);
    if (!pkey && passphrase_asked) {
        ssl.err_clear_error();
        return "the private key " + key +
               " is encrypted with a passphrase, which molt cannot be given: write it "
               "unencrypted, readable by root only (openssl pkey -in " +
               key + " -out KEY.pem)";
    }
    if (!pkey) return "cannot load the private key " + key + ": " + openssl_errors(ssl);
    if (ssl.use_private_key(ctx.get(), pkey.get()) != 1 || ssl.check_private_key(ctx.get()) != 1) {
        return "the private key " + key + " does not match the certificate " + cert + ": " +
               openssl_errors(ssl);
    }
    if (!client_ca.empty() &&
        ssl.load_verify_locations(ctx.get(), client_ca.c_str(), nullptr) != 1) {
        return "cannot load the client CA " + client_ca + ": " + openssl_errors(ssl);
    }
    return "";
}

}  // namespace molt::config
