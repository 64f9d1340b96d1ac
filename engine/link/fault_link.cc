#include "engine/link/fault_link.h"

#include <fmt/format.h>

#include <utility>

namespace cairn {

FaultLink::FaultLink(std::unique_ptr<Link> inner, WireFaultFn fault)
    : fault_(std::move(fault)),
      peer_(inner->peer()),
      peer_names_(inner->peer_names()),
      credentials_(inner->credentials()),
      inner_(std::move(inner)) {}

FaultLink::~FaultLink() = default;

Status FaultLink::CutStatus() const { return Aborted(fmt::format("link to {} cut", peer_)); }

Status FaultLink::Send(FrameType type, std::string_view body, std::span<const char> payload) {
  if (!inner_) return CutStatus();
  if (!fault_) return inner_->Send(type, body, payload);
  return Apply(EncodeFrame(type, body, payload));
}

Status FaultLink::SendEncoded(std::string_view frame) {
  if (!inner_) return CutStatus();
  if (!fault_) return inner_->SendEncoded(frame);
  return Apply(std::string(frame));
}

Status FaultLink::Apply(std::string bytes) {
  switch (fault_(bytes)) {
    case WireFault::kDeliver:
      return inner_->SendEncoded(bytes);
    case WireFault::kDrop:
      return OkStatus();
    case WireFault::kDuplicate:
      RETURN_IF_ERROR(inner_->SendEncoded(bytes));
      return inner_->SendEncoded(bytes);
    case WireFault::kCut:
      break;
  }
  std::unique_ptr<Link> broken;
  {
    std::lock_guard lock(mu_);
    broken = std::move(inner_);
  }
  broken->Close();
  broken.reset();  // a socket closes only with its link
  return CutStatus();
}

Status FaultLink::Handshake() {
  if (!inner_) return CutStatus();
  Status st = inner_->Handshake();
  peer_names_ = inner_->peer_names();
  return st;
}

StatusOr<Frame> FaultLink::Receive(std::chrono::milliseconds timeout) {
  if (!inner_) return CutStatus();
  return inner_->Receive(timeout);
}

void FaultLink::Close() {
  std::lock_guard lock(mu_);
  if (inner_) inner_->Close();
}

}  // namespace cairn
