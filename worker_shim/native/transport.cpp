// Plain and TLS connection I/O, and the PROXY header's framing (see transport.hpp).
#include "transport.hpp"

#include <errno.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <stdexcept>
#include <utility>

namespace molt::native {

namespace {

thread_local std::string last_tls_error;

std::string openssl_errors() {
    std::string out;
    while (const unsigned long code = ERR_get_error()) {
        char buf[256];
        ERR_error_string_n(code, buf, sizeof buf);
        if (!out.empty()) out += "; ";
        out += buf;
    }
    return out.empty() ? "unknown OpenSSL error" : out;
}

[[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error(what + ": " + openssl_errors());
}

// ALPN: http/1.1 when the client offers it; otherwise no ALPN at all (as Python's ssl does).
int select_alpn(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
                unsigned int inlen, void*) {
    static const unsigned char kOurs[] = "\x08http/1.1";
    unsigned char* chosen = nullptr;
    if (SSL_select_next_proto(&chosen, outlen, kOurs, sizeof kOurs - 1, in, inlen) !=
        OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_NOACK;
    }
    *out = chosen;
    return SSL_TLSEXT_ERR_OK;
}

// A subject or issuer the way molt_shim/tls.py (_oneline) writes it for the Python engine
// ("/O=Example/CN=client one"): attribute names as Python's ssl module names them (OpenSSL's
// long names), the common ones shortened, values in UTF-8. Kept identical to that function;
// tests/shim/test_tls.py asserts the same environ through both engines.
std::string oneline(X509_NAME* name) {
    std::string out;
    for (int i = 0; i < X509_NAME_entry_count(name); ++i) {
        X509_NAME_ENTRY* entry = X509_NAME_get_entry(name, i);
        char key[128];
        OBJ_obj2txt(key, sizeof key, X509_NAME_ENTRY_get_object(entry), 0);
        static const char* const kShort[][2] = {{"countryName", "C"},
                                                {"stateOrProvinceName", "ST"},
                                                {"localityName", "L"},
                                                {"organizationName", "O"},
                                                {"organizationalUnitName", "OU"},
                                                {"commonName", "CN"},
                                                {"emailAddress", "emailAddress"}};
        const char* shown = key;
        for (const auto& pair : kShort) {
            if (std::strcmp(pair[0], key) == 0) shown = pair[1];
        }
        unsigned char* utf8 = nullptr;
        const int len = ASN1_STRING_to_UTF8(&utf8, X509_NAME_ENTRY_get_data(entry));
        out += '/';
        out += shown;
        out += '=';
        if (len > 0) out.append(reinterpret_cast<char*>(utf8), static_cast<std::size_t>(len));
        OPENSSL_free(utf8);
    }
    return out;
}

bool wait_writable_for(int fd, double timeout_s) {
    if (timeout_s <= 0) return false;
    pollfd p{fd, POLLOUT, 0};
    int rc;
    do {
        rc = ::poll(&p, 1, static_cast<int>(timeout_s * 1000.0) + 1);
    } while (rc < 0 && errno == EINTR);
    return rc > 0;
}

// An SSL_read/SSL_write result as a socket call's: -1 with errno, or 0 for the orderly end.
ssize_t as_socket_result(SSL* ssl, int rc) {
    switch (SSL_get_error(ssl, rc)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            errno = EAGAIN;
            return -1;
        case SSL_ERROR_ZERO_RETURN:  // close_notify, or (IGNORE_UNEXPECTED_EOF) a bare EOF
            return 0;
        case SSL_ERROR_SYSCALL:
            if (errno == 0) errno = ECONNRESET;
            ERR_clear_error();
            return -1;
        default:
            last_tls_error = openssl_errors();
            errno = EPROTO;
            return -1;
    }
}

}  // namespace

SslCtxPtr make_tls_context(const TlsOptions& options) {
    SslCtxPtr ctx(SSL_CTX_new(TLS_server_method()));
    if (!ctx) fail("cannot make a TLS context");
    SSL_CTX_set_min_proto_version(ctx.get(),
                                  options.min_version == "1.3" ? TLS1_3_VERSION : TLS1_2_VERSION);
    // Renegotiation off: a write then never waits for a read. A bare EOF ends a connection
    // like close_notify does (clients often skip it after Connection: close).
    SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
    // Partial writes and a moving buffer: transport_sendv builds each record's bytes afresh.
    SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE |
                                    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_use_certificate_chain_file(ctx.get(), options.cert.c_str()) != 1) {
        fail("cannot load the certificate chain " + options.cert);
    }
    // Never OpenSSL's terminal prompt for a passphrase (the master refuses such a key first).
    SSL_CTX_set_default_passwd_cb(ctx.get(), [](char*, int, int, void*) { return -1; });
    if (SSL_CTX_use_PrivateKey_file(ctx.get(), options.key.c_str(), SSL_FILETYPE_PEM) != 1) {
        fail("cannot load the private key " + options.key);
    }
    if (SSL_CTX_check_private_key(ctx.get()) != 1) {
        fail("the key " + options.key + " does not match the certificate " + options.cert);
    }
    SSL_CTX_set_alpn_select_cb(ctx.get(), select_alpn, nullptr);
    static const unsigned char kSessionContext[] = "molt";
    SSL_CTX_set_session_id_context(ctx.get(), kSessionContext, sizeof kSessionContext - 1);
    if (!options.ticket_keys.empty() &&  // its length is checked by the shim's config.load
        SSL_CTX_set_tlsext_ticket_keys(ctx.get(), const_cast<char*>(options.ticket_keys.data()),
                                       static_cast<long>(options.ticket_keys.size())) != 1) {
        fail("cannot set the session-ticket keys");
    }
    if (!options.client_ca.empty()) {
        if (SSL_CTX_load_verify_locations(ctx.get(), options.client_ca.c_str(), nullptr) != 1) {
            fail("cannot load the client CA " + options.client_ca);
        }
        SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
    }
    return ctx;
}

TlsPeer tls_peer(SSL* ssl) {
    TlsPeer peer;
    peer.protocol = SSL_get_version(ssl);
    X509* cert = SSL_get1_peer_certificate(ssl);
    if (cert != nullptr && SSL_get_verify_result(ssl) == X509_V_OK) {
        peer.subject = oneline(X509_get_subject_name(cert));
        peer.issuer = oneline(X509_get_issuer_name(cert));
        peer.verified = true;
    }
    X509_free(cert);
    return peer;
}

std::string tls_error_text() {
    return std::exchange(last_tls_error, {});
}

ssize_t transport_recv(int fd, SSL* ssl, char* buf, std::size_t size, double write_wait_s) {
    if (ssl == nullptr) return ::recv(fd, buf, size, 0);
    for (;;) {
        ERR_clear_error();
        const int n = SSL_read(ssl, buf, static_cast<int>(std::min<std::size_t>(size, INT_MAX)));
        if (n > 0) return n;
        // The handshake's reply did not fit the socket buffer: rare and short, wait here.
        if (SSL_get_error(ssl, n) == SSL_ERROR_WANT_WRITE && wait_writable_for(fd, write_wait_s))
            continue;
        return as_socket_result(ssl, n);
    }
}

ssize_t transport_sendv(int fd, SSL* ssl, const iovec* iov, int count) {
    if (ssl == nullptr) {
        msghdr msg{};
        msg.msg_iov = const_cast<iovec*>(iov);
        msg.msg_iovlen = static_cast<std::size_t>(count);
        return ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    }
    // One record's worth (16 KiB) from the front of the iovecs, so a head and a small body share
    // a record. A retry after EAGAIN is given the same iovecs, hence the same bytes and length,
    // which is what OpenSSL asks of a repeated SSL_write.
    constexpr std::size_t kRecord = 16384;
    char joined[kRecord];
    const char* data = joined;
    std::size_t len = 0;
    int first = 0;
    while (first < count && iov[first].iov_len == 0) ++first;
    if (first == count) return 0;
    if (iov[first].iov_len >= kRecord) {
        data = static_cast<const char*>(iov[first].iov_base);
        len = kRecord;
    } else {
        for (int i = first; i < count && len < kRecord; ++i) {
            const std::size_t take = std::min(iov[i].iov_len, kRecord - len);
            std::memcpy(joined + len, iov[i].iov_base, take);
            len += take;
        }
    }
    ERR_clear_error();
    const int n = SSL_write(ssl, data, static_cast<int>(len));
    if (n > 0) return n;
    const ssize_t rc = as_socket_result(ssl, n);
    if (rc == 0) {
        errno = EPIPE;  // the peer's close_notify arrived: it takes nothing more
        return -1;
    }
    return rc;
}

bool transport_waits_to_write(SSL* ssl) {
    return ssl != nullptr && SSL_want_write(ssl);
}

bool transport_pending(SSL* ssl) {
    return ssl != nullptr && SSL_pending(ssl) > 0;
}

std::size_t proxy_header_length(const std::string& data) {
    if (data.empty()) return 0;
    static const char kV1[] = "PROXY ";
    static const char kSignature[12] = {'\r', '\n', '\r', '\n', '\0', '\r',
                                        '\n', 'Q',  'U',  'I',  'T',  '\n'};
    if (data[0] == 'P') {
        const std::size_t n = std::min<std::size_t>(data.size(), 6);
        if (data.compare(0, n, kV1, n) != 0) return data.size();
        const std::size_t end = data.substr(0, kProxyV1Max).find("\r\n");
        if (end != std::string::npos) return end + 2;
        return data.size() >= kProxyV1Max ? kProxyV1Max : 0;
    }
    if (data[0] == '\r') {
        const std::size_t n = std::min<std::size_t>(data.size(), sizeof kSignature);
        if (std::memcmp(data.data(), kSignature, n) != 0) return data.size();
        if (data.size() < kProxyV2Fixed) return 0;
        const std::size_t body =
            (static_cast<unsigned char>(data[14]) << 8) | static_cast<unsigned char>(data[15]);
        if (body > kProxyV2MaxBody) return kProxyV2Fixed;
        return data.size() >= kProxyV2Fixed + body ? kProxyV2Fixed + body : 0;
    }
    return data.size();
}

}  // namespace molt::native
