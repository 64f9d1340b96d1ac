// Link: a framed, ordered, bidirectional stream between two Cairn
// processes (source <-> sink, or client <-> cairnd's control socket).
//
// Implementations: TCP and Unix-domain sockets over Boost.Asio
// (engine/link/tcp_link.h; the only place Asio is compiled), TLS over TCP
// with OpenSSL on the socket (tls_link.h, made by tcp_link.h), an in-process
// pair (MakeMemoryLinkPair) for tests. Fault layers wrap any Link
// (engine/link/fault_link.h).
//
// Every received frame has its header and body checksums verified (see
// frame.h); payload verification belongs to the layer that knows the
// payload's hash.
//
// Thread-safety: Send and Receive are called by one thread at a time (the
// protocols here are request/response, so one thread drives each link).
// Close may be called from any thread; it makes blocked calls return
// kAborted.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/base/status.h"
#include "engine/epoch/epoch.h"
#include "engine/format/frame.h"

namespace cairn {

// Who is at the other end of a local (Unix) socket, as the kernel says
// (SO_PEERCRED) when it connected.
struct PeerCredentials {
  int pid = 0;
  uint32_t uid = 0;
  uint32_t gid = 0;
};

class Link : public FrameWriter {
 public:
  // Sends one frame (header, body, payload), blocking until it is handed
  // to the transport. kAborted if the link is closed or cut.
  virtual Status Send(FrameType type, std::string_view body, std::span<const char> payload) = 0;
  // Sends `frame`, one frame as EncodeFrame encodes it, byte for byte: for
  // a fault layer (fault_link.h) that changed bits of it, which Send would
  // encode anew with fresh checksums. Errors as Send. The default decodes
  // the frame and calls Send, which puts the same bytes on the wire; it
  // fails with kInternal on a frame whose header or body fails its checks,
  // which only a link that overrides this can carry.
  virtual Status SendEncoded(std::string_view frame) {
    StringSource src(frame);
    StatusOr<Frame> f = ReadFrame(src);
    if (!f.ok() || src.consumed() != frame.size()) {
      return Internal("link to " + peer() + " cannot carry a damaged frame" +
                      (f.ok() ? std::string() : " (" + f.status().message() + ")"));
    }
    return Send(f->type, f->body, f->payload);
  }
  // Receives the next frame. kUnavailable "no frame from PEER within N ms"
  // on timeout (the link stays usable); kAborted when the peer closed or the
  // link was cut; kDataLoss when a frame fails its checks (the stream can no
  // longer be trusted: close it).
  virtual StatusOr<Frame> Receive(std::chrono::milliseconds timeout) = 0;
  virtual void Close() = 0;
  virtual const std::string& peer() const = 0;
  // Completes the link's handshake if one is left to do: a TLS link that
  // a Listener accepted, whose handshake runs on the session's thread so
  // that a slow peer holds up no other. Send and Receive call it first.
  // kPermissionDenied if the peer could not be authenticated.
  virtual Status Handshake() { return OkStatus(); }
  // The peer's authenticated names (its certificate's CN, then its DNS and
  // IP subjectAltNames), after Handshake; empty on a link without TLS.
  virtual const std::vector<std::string>& peer_names() const {
    static const std::vector<std::string> kNone;
    return kNone;
  }
  // The peer process of a Unix socket; nullopt on other links.
  virtual std::optional<PeerCredentials> credentials() const { return std::nullopt; }

  Status Write(FrameType type, std::string_view body, std::span<const char> payload) final {
    return Send(type, body, payload);
  }
};

// Two connected in-process links. Each direction buffers at most
// `capacity_bytes` (a sender blocks when it is full), like a socket. Faults
// are injected by wrapping either end in a FaultLink (fault_link.h).
std::pair<std::unique_ptr<Link>, std::unique_ptr<Link>> MakeMemoryLinkPair(
    size_t capacity_bytes = 16u << 20);

}  // namespace cairn
