// FaultLink: a fault-injecting layer of the Link seam (link.h) that stacks
// on any Link: the in-process pair, TCP or Unix sockets (tcp_link.h), or
// another wrapper. A hook sees every frame sent through it, encoded, and
// says what the wire does with it; received frames pass through untouched
// (wrap the other end to fault the other direction).
//
// Cost: each frame sent is encoded into one string for the hook (a copy of
// its payload, up to 8 MiB): for tests and the simulator, not production.
//
// Thread-safety: as link.h. The hook is called on the sending thread,
// without a lock of this layer held. Close may be called from any thread,
// even while a Send cuts the link.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"
#include "engine/link/link.h"

namespace cairn {

// What the wire does with one encoded frame.
enum class WireFault {
  kDeliver,    // as it is now (the hook may have changed its bytes)
  kDrop,       // lost; the sender cannot tell
  kDuplicate,  // delivered twice
  kCut,        // the link breaks: this frame and everything after it is lost
};
// Sees (and may change) every encoded frame sent in one direction.
using WireFaultFn = std::function<WireFault(std::string& frame_bytes)>;

class FaultLink final : public Link {
 public:
  // Wraps `inner`, which it owns; `fault` may be empty (no faults).
  FaultLink(std::unique_ptr<Link> inner, WireFaultFn fault);
  ~FaultLink() override;
  FaultLink(const FaultLink&) = delete;
  FaultLink& operator=(const FaultLink&) = delete;

  // Encodes the frame, lets the hook see it and does what it says:
  //  kDeliver    sends the bytes as the hook left them (SendEncoded on the
  //              wrapped link: a flipped bit reaches the peer as it is);
  //  kDrop       sends nothing and returns OK;
  //  kDuplicate  sends them twice;
  //  kCut        closes and destroys the wrapped link, as a broken
  //              connection: the peer receives what was sent before, then
  //              finds the link closed; what was in flight towards this
  //              end is lost too. Returns kAborted "link to PEER cut", as
  //              does every later Send or Receive.
  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override;
  // The same, for a frame already encoded (a FaultLink over a FaultLink).
  Status SendEncoded(std::string_view frame) override;
  StatusOr<Frame> Receive(std::chrono::milliseconds timeout) override;
  void Close() override;
  // The wrapped link's peer, also after a cut.
  const std::string& peer() const override { return peer_; }
  // The wrapped link's handshake; its names are kept after a cut.
  Status Handshake() override;
  const std::vector<std::string>& peer_names() const override { return peer_names_; }
  std::optional<PeerCredentials> credentials() const override { return credentials_; }

 private:
  Status Apply(std::string bytes);
  Status CutStatus() const;

  WireFaultFn fault_;
  const std::string peer_;
  std::vector<std::string> peer_names_;
  const std::optional<PeerCredentials> credentials_;
  // Written (reset by a cut) only by the sending thread, with mu_ held;
  // read by it without the lock, and by Close with it.
  std::mutex mu_;
  std::unique_ptr<Link> inner_;
};

}  // namespace cairn
