// Pacer and PacedLink: a cap on the bytes a cairnd sends to its sinks, for
// a link between sites that carries other traffic too (`[cairnd]
// max_send_rate`).
//
// One Pacer is shared by every link it caps. Each frame sent through a
// PacedLink reserves its bytes in turn and goes once the bytes reserved
// before it have drained at the rate; after an idle spell up to `burst`
// bytes go at once. A frame is never split: a 4 MiB record at 1 MiB/s
// goes, then the next waits 4 s.
//
// The cap slows shipping, never the primary: the guest writes to its image
// as before, the epoch in flight takes longer and the restore points age
// more (lag, RPO). A volume whose sink is far behind is still one epoch at
// a time.
//
// Thread-safety: Pacer::Take and Wake from any thread; PacedLink as link.h
// (Close from any thread wakes a Send waiting for its turn).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/clock.h"
#include "engine/base/status.h"
#include "engine/link/link.h"

namespace cairn {

class Pacer {
 public:
  // REQUIRES: bytes_per_second > 0.
  explicit Pacer(uint64_t bytes_per_second, uint64_t burst = 1u << 20, Clock& clock = RealClock());

  // Blocks until `bytes` may go. kAborted at once when `cancelled` is (or
  // becomes: call Wake) true.
  Status Take(uint64_t bytes, const std::atomic<bool>& cancelled);
  // Wakes every Take so that it checks its `cancelled` again.
  void Wake();

  uint64_t rate() const { return rate_; }

 private:
  const uint64_t rate_;
  const Clock::Duration burst_time_;
  Clock& clock_;
  std::mutex mu_;
  std::condition_variable cv_;
  Clock::TimePoint next_;  // when the bytes reserved so far have drained
};

class PacedLink final : public Link {
 public:
  PacedLink(std::unique_ptr<Link> inner, std::shared_ptr<Pacer> pacer);

  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override;
  Status SendEncoded(std::string_view frame) override;
  StatusOr<Frame> Receive(std::chrono::milliseconds timeout) override {
    return inner_->Receive(timeout);
  }
  void Close() override;
  const std::string& peer() const override { return inner_->peer(); }
  Status Handshake() override { return inner_->Handshake(); }
  const std::vector<std::string>& peer_names() const override { return inner_->peer_names(); }
  std::optional<PeerCredentials> credentials() const override { return inner_->credentials(); }

 private:
  Status Wait(uint64_t bytes);

  std::unique_ptr<Link> inner_;
  std::shared_ptr<Pacer> pacer_;
  std::atomic<bool> closed_{false};
};

}  // namespace cairn
