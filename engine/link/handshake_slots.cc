#include "engine/link/handshake_slots.h"

namespace cairn {

HandshakeSlots& HandshakeSlots::Get() {
  static HandshakeSlots slots;
  return slots;
}

HandshakeSlots::Slot HandshakeSlots::Acquire(const std::string& peer, size_t max,
                                             std::chrono::steady_clock::time_point deadline) {
  std::unique_lock lock(mu_);
  const auto has_room = [&] {
    auto it = in_flight_.find(peer);
    return max == 0 || it == in_flight_.end() || it->second < max;
  };
  if (!cv_.wait_until(lock, deadline, has_room)) return Slot();
  ++in_flight_[peer];
  return Slot(this, peer);
}

size_t HandshakeSlots::InFlight(const std::string& peer) const {
  std::lock_guard lock(mu_);
  auto it = in_flight_.find(peer);
  return it == in_flight_.end() ? 0 : it->second;
}

void HandshakeSlots::Release(const std::string& peer) {
  {
    std::lock_guard lock(mu_);
    auto it = in_flight_.find(peer);
    if (it != in_flight_.end() && --it->second == 0) in_flight_.erase(it);
  }
  cv_.notify_all();
}

HandshakeSlots::Slot::~Slot() {
  if (slots_) slots_->Release(peer_);
}

}  // namespace cairn
