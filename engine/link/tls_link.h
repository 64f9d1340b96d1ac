// For tcp_link.cc: a Link speaking mutual TLS 1.3 over a connected TCP
// socket, OpenSSL driven directly (no Asio).
//
// Why its own: Asio's ssl::stream makes one send(2) of each 16 KiB record
// and copies every byte through OpenSSL's BIO pair and its own buffers,
// at both ends. Here OpenSSL reads straight from the socket, up to 128
// KiB per recv(2) (read-ahead), and the records it makes are gathered so
// that one send(2) carries up to 128 KiB of them (bench/link_bench.cc
// measures the difference in CPU per GiB).
//
// The socket is non-blocking; each wait is a poll(2) with the link's
// timeouts (tcp_link.h). Close shuts the socket down, which wakes a
// thread blocked in one.
//
// Thread-safety: as link.h.
#pragma once

#include <memory>
#include <string>

#include "engine/base/status.h"
#include "engine/link/link.h"
#include "engine/link/tcp_link.h"

namespace cairn {

// The server's end; takes `fd`, a connected socket (closed with the link).
// The handshake runs in the first Link::Handshake (or Send or Receive),
// within options.handshake_timeout. REQUIRES: options.tls.
std::unique_ptr<Link> AcceptTls(int fd, std::string peer, const LinkOptions& options);

// The client's end: runs the handshake now, within options.connect_timeout.
// The server's certificate must carry `name` (a DNS or IP subjectAltName).
// kPermissionDenied if either end refuses the other; kAborted on timeout.
// Takes `fd` whatever the outcome. REQUIRES: options.tls.
StatusOr<std::unique_ptr<Link>> ConnectTls(int fd, std::string peer, const LinkOptions& options,
                                           const std::string& name);

}  // namespace cairn
