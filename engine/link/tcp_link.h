// Socket links: TCP between sites, Unix-domain for the local control API.
// Built on Boost.Asio, which only tcp_link.cc includes (it is heavy); with
// LinkOptions::tls a TCP link is tls_link.h's, which drives OpenSSL itself.
//
// Timeouts: Receive waits up to its timeout for the first byte of a frame
// (kUnavailable after it, link still usable); once a frame has started, the
// rest must arrive within the link's stall timeout or the link is broken
// (kAborted). Send fails with kAborted if the peer does not drain the
// socket within the stall timeout.
//
// Thread-safety: see link.h. A Listener's Accept is called by one thread;
// Close from any thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "engine/base/status.h"
#include "engine/link/link.h"
#include "engine/link/tls.h"

namespace cairn {

struct LinkOptions {
  // Each of: the wait for a handshake slot (TLS), the TCP connect, the
  // TLS handshake.
  std::chrono::milliseconds connect_timeout{5000};
  std::chrono::milliseconds stall_timeout{60000};
  // Mutual TLS on TCP links (tls.h); null: plaintext. A Listener's links
  // finish their handshake in Link::Handshake, within handshake_timeout.
  std::shared_ptr<const TlsContext> tls;
  std::chrono::milliseconds handshake_timeout{10000};
  // ConnectTcp with TLS: the name the server's certificate must carry (a
  // DNS or IP subjectAltName); empty: the host connected to.
  std::string peer_name;
  // ConnectTcp with TLS: how many connects of this process to one
  // host:port may be before the end of their handshake at once (a sink
  // takes 8 from one address, LinkServerLimits); the others wait for one
  // to finish, within connect_timeout (handshake_slots.h). 0: no bound.
  size_t max_handshakes_per_peer = 4;
};

// "host:port" -> (host, port). kInvalidArgument naming the text otherwise.
StatusOr<std::pair<std::string, uint16_t>> ParseHostPort(const std::string& text);

// kUnavailable if nothing listens there or the connect times out. With
// TLS: kPermissionDenied if the handshake fails (the server's certificate
// is not from the CA or does not carry the expected name).
StatusOr<std::unique_ptr<Link>> ConnectTcp(const std::string& host, uint16_t port,
                                           const LinkOptions& options = {});
StatusOr<std::unique_ptr<Link>> ConnectUnix(const std::string& path,
                                            const LinkOptions& options = {});

class Listener {
 public:
  // port 0 picks a free port (see port()). kFailedPrecondition if the
  // address is in use or not ours.
  static StatusOr<std::unique_ptr<Listener>> ListenTcp(const std::string& host, uint16_t port,
                                                       const LinkOptions& options = {});
  // Replaces a stale socket file at `path`; refuses (kFailedPrecondition)
  // if another process still answers there. The socket file gets `mode`
  // and, if `group` is set, that group (who may connect at all); its links
  // carry the peer's credentials (Link::credentials).
  static StatusOr<std::unique_ptr<Listener>> ListenUnix(const std::string& path,
                                                        const LinkOptions& options = {},
                                                        uint32_t mode = 0600,
                                                        std::optional<uint32_t> group = {});
  virtual ~Listener() = default;
  // Blocks until a peer connects. kAborted after Close.
  virtual StatusOr<std::unique_ptr<Link>> Accept() = 0;
  virtual void Close() = 0;
  virtual uint16_t port() const = 0;
};

}  // namespace cairn
