// HandshakeSlots: how many connects of this process to one peer may be
// unauthenticated at once (ConnectTcp with TLS, from the TCP connect to the
// end of the handshake).
//
// A sink closes at once a connection from an address that already has
// LinkServerLimits::max_handshakes_per_address (8) connections before
// their handshake: a flood from one place must not hold its threads. A
// source that starts a thousand volumes opens a thousand links at once,
// from one address; without a bound of its own, all but 8 were closed and
// retried with backoff, hundreds of errors in its log. With one, each
// waits here for a slot instead.
//
// Thread-safe: one mutex for the process.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <map>
#include <mutex>
#include <string>

namespace cairn {

class HandshakeSlots {
 public:
  // The process's slots.
  static HandshakeSlots& Get();

  // A slot for `peer` ("host:port"), held until the Slot is destroyed:
  // waits while `max` are held, until `deadline`. An empty Slot (held()
  // false) if the deadline passed; max 0 means no bound.
  class Slot {
   public:
    Slot() = default;
    Slot(Slot&& o) noexcept : slots_(o.slots_), peer_(std::move(o.peer_)) { o.slots_ = nullptr; }
    Slot& operator=(Slot&&) = delete;
    ~Slot();
    bool held() const { return slots_ != nullptr; }

   private:
    friend class HandshakeSlots;
    Slot(HandshakeSlots* slots, std::string peer) : slots_(slots), peer_(std::move(peer)) {}
    HandshakeSlots* slots_ = nullptr;
    std::string peer_;
  };
  Slot Acquire(const std::string& peer, size_t max, std::chrono::steady_clock::time_point deadline);

  // Slots held now for `peer` (tests).
  size_t InFlight(const std::string& peer) const;

 private:
  void Release(const std::string& peer);

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, size_t> in_flight_;
};

}  // namespace cairn
