#include "engine/link/paced_link.h"

#include <algorithm>
#include <utility>

namespace cairn {
namespace {

Clock::Duration TimeFor(uint64_t bytes, uint64_t rate) {
  return std::chrono::duration_cast<Clock::Duration>(
      std::chrono::duration<double>(static_cast<double>(bytes) / static_cast<double>(rate)));
}

}  // namespace

Pacer::Pacer(uint64_t bytes_per_second, uint64_t burst, Clock& clock)
    : rate_(bytes_per_second),
      burst_time_(TimeFor(burst, bytes_per_second)),
      clock_(clock),
      next_(clock.Now()) {}

Status Pacer::Take(uint64_t bytes, const std::atomic<bool>& cancelled) {
  std::unique_lock lock(mu_);
  // The bytes reserved before this frame drain at the rate until `end`; it
  // goes once at most a burst of them is left (an idle spell banks none).
  const Clock::TimePoint end = std::max(next_, clock_.Now());
  next_ = end + TimeFor(bytes, rate_);
  const Clock::TimePoint go = end - burst_time_;
  clock_.WaitUntil(lock, cv_, go, [&] { return cancelled.load() || clock_.Now() >= go; });
  if (cancelled.load())
    return Aborted("link closed while waiting for its turn under max_send_rate");
  return OkStatus();
}

void Pacer::Wake() {
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

PacedLink::PacedLink(std::unique_ptr<Link> inner, std::shared_ptr<Pacer> pacer)
    : inner_(std::move(inner)), pacer_(std::move(pacer)) {}

Status PacedLink::Wait(uint64_t bytes) { return pacer_->Take(bytes, closed_); }

Status PacedLink::Send(FrameType type, std::string_view body, std::span<const char> payload) {
  RETURN_IF_ERROR(Wait(kFrameHeaderSize + body.size() + payload.size()));
  return inner_->Send(type, body, payload);
}

Status PacedLink::SendEncoded(std::string_view frame) {
  RETURN_IF_ERROR(Wait(frame.size()));
  return inner_->SendEncoded(frame);
}

void PacedLink::Close() {
  closed_.store(true);
  pacer_->Wake();
  inner_->Close();
}

}  // namespace cairn
