// The bytes of one connection: a plain socket, or TLS (OpenSSL) over it, and the PROXY
// protocol header that may precede either.
//
// The engine reads and writes a connection only through transport_recv / transport_sendv,
// which keep socket semantics for both kinds: a byte count, 0 for an orderly end, or -1 with
// errno (EAGAIN whenever TLS waits for the network, in either direction). So the serving
// loop, parking and the sweep do not know whether a connection is encrypted.
#pragma once

#include <openssl/ssl.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <memory>
#include <string>

namespace molt::native {

// listen[].tls, as the worker config gives it.
struct TlsOptions {
    std::string cert;
    std::string key;
    std::string client_ca;    // "": no client certificates asked for
    std::string min_version;  // "1.2" or "1.3"
    // The generation's session-ticket keys (80 bytes, MOLT_TLS_TICKET_KEYS), the same in every
    // worker so a ticket resumes on any of them; empty: OpenSSL's own random key.
    std::string ticket_keys;
};

struct SslCtxFree {
    void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
};
struct SslFree {
    void operator()(SSL* ssl) const { SSL_free(ssl); }
};
using SslCtxPtr = std::unique_ptr<SSL_CTX, SslCtxFree>;
using SslPtr = std::unique_ptr<SSL, SslFree>;

// One listener's server context, loaded when the worker starts (one generation, one set of
// certificates). Throws std::runtime_error naming the file on a bad certificate or key.
SslCtxPtr make_tls_context(const TlsOptions& options);

// What one connection's environ says about its TLS session (after the handshake).
struct TlsPeer {
    std::string protocol;   // SSL_PROTOCOL, "TLSv1.3"
    std::string subject;    // SSL_CLIENT_S_DN of a verified client certificate, or ""
    std::string issuer;     // SSL_CLIENT_I_DN
    bool verified = false;  // a client certificate was presented and verified
};
TlsPeer tls_peer(SSL* ssl);

// Socket-like I/O over `fd`, through `ssl` when it is not null.
ssize_t transport_recv(int fd, SSL* ssl, char* buf, std::size_t size, double write_wait_s);
ssize_t transport_sendv(int fd, SSL* ssl, const iovec* iov, int count);
// Decrypted bytes are waiting inside OpenSSL: epoll will not report them, so read before parking.
bool transport_pending(SSL* ssl);
// The last TLS read stopped because OpenSSL had to write first (and gave up waiting).
bool transport_waits_to_write(SSL* ssl);
// The reason of the last TLS failure on this thread (for the log line), and clears it.
std::string tls_error_text();

// PROXY protocol framing: where the header that starts `data` ends, so the engine reads the
// header's bytes and no more (the bytes after it are the client's, possibly a TLS handshake).
// 0: not known yet (read more). Otherwise the byte count to hand to the Python parser
// (molt_shim/proxyproto.py, the one copy of the rule), which accepts or rejects it; when the
// bytes cannot be a header, the count is what is there and the parser says why.
std::size_t proxy_header_length(const std::string& data);
constexpr std::size_t kProxyV1Max = 107;       // proxyproto.V1_MAX
constexpr std::size_t kProxyV2Fixed = 16;      // proxyproto.V2_FIXED
constexpr std::size_t kProxyV2MaxBody = 4096;  // proxyproto.V2_MAX_BODY
constexpr std::size_t kProxyHeaderMax = kProxyV2Fixed + kProxyV2MaxBody;

}  // namespace molt::native
