#include "config/tls_files.hpp"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include <memory>

namespace molt::config {

namespace {

// OpenSSL's reasons for the last failure, oldest first, and the queue emptied.
std::string openssl_errors() {
    std::string text;
    while (const unsigned long code = ERR_get_error()) {
        char buffer[256];
        ERR_error_string_n(code, buffer, sizeof buffer);
        if (!text.empty()) text += "; ";
        text += buffer;
    }
    return text.empty() ? "unknown OpenSSL error" : text;
}

}  // namespace

std::string check_tls_files(const std::string& cert, const std::string& key,
                            const std::string& client_ca) {
    ERR_clear_error();
    std::unique_ptr<SSL_CTX, decltype(&SSL_CTX_free)> ctx(SSL_CTX_new(TLS_server_method()),
                                                          &SSL_CTX_free);
    if (!ctx) return "cannot create a TLS context: " + openssl_errors();
    if (SSL_CTX_use_certificate_chain_file(ctx.get(), cert.c_str()) != 1) {
        return "cannot load the certificate chain " + cert + ": " + openssl_errors();
    }
    // Read first, then installed: OpenSSL 3 checks the match while installing, and "cannot
    // read the key" and "the key belongs to another certificate" need different fixes.
    std::unique_ptr<BIO, decltype(&BIO_free)> file(BIO_new_file(key.c_str(), "r"), &BIO_free);
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> pkey(
        file ? PEM_read_bio_PrivateKey(file.get(), nullptr, nullptr, nullptr) : nullptr,
        &EVP_PKEY_free);
    if (!pkey) return "cannot load the private key " + key + ": " + openssl_errors();
    if (SSL_CTX_use_PrivateKey(ctx.get(), pkey.get()) != 1 ||
        SSL_CTX_check_private_key(ctx.get()) != 1) {
        return "the private key " + key + " does not match the certificate " + cert + ": " +
               openssl_errors();
    }
    if (!client_ca.empty() &&
        SSL_CTX_load_verify_locations(ctx.get(), client_ca.c_str(), nullptr) != 1) {
        return "cannot load the client CA " + client_ca + ": " + openssl_errors();
    }
    return "";
}

}  // namespace molt::config
