// The standby's half of an epoch (see epoch.h): ApplyStream writes
// verified records, ApplyEpoch replays a spool through the verifier, and
// RevertToPoint puts the head back as it is at a restore point.
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "engine/epoch/epoch.h"
#include "engine/epoch/zeros.h"

namespace cairn {

ApplyStream::ApplyStream(Volume& target, const ApplyOptions& options, TargetState state)
    : target_(target), options_(options), state_(state) {
  assert(options.window > 0);
}

ApplyStream::~ApplyStream() {
  if (io_) (void)io_->Drain();
}

Status ApplyStream::Begin(uint64_t image_size) {
  frames_.assign(options_.window, Frame{});
  free_.clear();
  for (uint32_t i = options_.window; i > 0; --i) free_.push_back(i - 1);
  bytes_in_flight_ = 0;
  // Opened for writing first: the size then comes from the same handle,
  // not from one more open.
  ASSIGN_OR_RETURN(io_, target_.OpenIo(""));
  ASSIGN_OR_RETURN(uint64_t have, target_.Size());
  if (have != image_size) RETURN_IF_ERROR(target_.Resize(image_size));
  return OkStatus();
}

Status ApplyStream::WaitOne() {
  AsyncIo::Completion c = io_->WaitOne();
  free_.push_back(static_cast<uint32_t>(c.tag));
  bytes_in_flight_ -= frames_[c.tag].payload.size();
  frames_[c.tag] = Frame{};  // its buffer goes back now, not when the slot is reused
  if (!c.status.ok()) return c.status.Annotate("writing the standby image");
  return OkStatus();
}

Status ApplyStream::Add(const VerifiedRecord& r, Frame frame) {
  assert(io_ && "Begin first");
  if (r.kind != RecordKind::kData && state_ == TargetState::kFreshImage) {
    return OkStatus();  // a new image reads as zeros already
  }
  const uint64_t bytes = frame.payload.size();
  // A record larger than window_bytes goes alone.
  while (free_.empty() || (options_.window_bytes > 0 && bytes_in_flight_ > 0 &&
                           bytes_in_flight_ + bytes > options_.window_bytes)) {
    RETURN_IF_ERROR(WaitOne());
  }
  const uint32_t slot = free_.back();
  free_.pop_back();
  frames_[slot] = std::move(frame);
  bytes_in_flight_ += bytes;
  if (r.kind == RecordKind::kData) {
    assert(frames_[slot].payload.size() == r.length);
    return io_->StartWrite(slot, r.offset, frames_[slot].payload);
  }
  return io_->StartZero(slot, r.offset, r.length);
}

Status ApplyStream::Finish() {
  assert(io_ && "Begin first");
  Status first;
  while (io_->InFlight() > 0) {
    Status st = WaitOne();
    if (first.ok()) first = st;
  }
  RETURN_IF_ERROR(first);
  return io_->Drain();
}

StatusOr<EpochSummary> ApplyEpoch(SpoolReader& spool, EpochVerifier& verifier, Volume& target,
                                  const ApplyOptions& options, TargetState state) {
  ApplyStream apply(target, options, state);
  while (true) {
    auto next = spool.Next();
    if (!next.ok()) {
      if (next.status().code() == Code::kAborted) {
        return DataLoss(fmt::format("spool ends before the end of epoch {} (incomplete epoch)",
                                    verifier.begin().id.seq));
      }
      return next.status();
    }
    auto step = verifier.Check(*next);
    if (!step.ok()) return step.status().Annotate(fmt::format("spool offset {}", spool.offset()));
    switch (*step) {
      case EpochVerifier::Step::kBegin:
        RETURN_IF_ERROR(apply.Begin(verifier.begin().id.image_size));
        break;
      case EpochVerifier::Step::kRecord:
        RETURN_IF_ERROR(apply.Add(verifier.record(), std::move(next).value()));
        break;
      case EpochVerifier::Step::kEnd:
        RETURN_IF_ERROR(apply.Finish());
        return verifier.summary();
    }
  }
}

StatusOr<uint64_t> RevertToPoint(Volume& target, const SnapInfo& point) {
  constexpr uint64_t kPiece = 4ull << 20;
  ASSIGN_OR_RETURN(const uint64_t size, target.Size());
  if (size != point.size) RETURN_IF_ERROR(target.Resize(point.size));
  ASSIGN_OR_RETURN(auto from, target.OpenIo(point.name));
  ASSIGN_OR_RETURN(auto to, target.OpenIo(""));
  std::vector<char> buf;
  uint64_t bytes = size != point.size ? std::max(size, point.size) - std::min(size, point.size) : 0;
  RETURN_IF_ERROR(target.DiffExtents(point.name, "", [&](const Extent& e) -> Status {
    for (uint64_t off = e.offset; off < e.offset + e.length;) {
      const uint64_t n = std::min(kPiece, e.offset + e.length - off);
      buf.resize(n);
      RETURN_IF_ERROR(from->StartRead(0, off, buf));
      RETURN_IF_ERROR(from->WaitOne().status);
      RETURN_IF_ERROR(IsAllZero(buf) ? to->StartZero(0, off, n) : to->StartWrite(0, off, buf));
      RETURN_IF_ERROR(to->WaitOne().status);
      off += n;
      bytes += n;
    }
    return OkStatus();
  }));
  RETURN_IF_ERROR(to->Drain());
  return bytes;
}

StatusOr<uint64_t> BytesSince(Volume& vol, const SnapInfo& snap) {
  ASSIGN_OR_RETURN(bool changed, vol.ChangedSince(snap));
  if (!changed) return uint64_t{0};
  ASSIGN_OR_RETURN(const uint64_t size, vol.Size());
  uint64_t bytes = std::max(size, snap.size) - std::min(size, snap.size);
  RETURN_IF_ERROR(vol.DiffExtents(snap.name, "", [&](const Extent& e) {
    bytes += e.length;
    return OkStatus();
  }));
  return bytes;
}

}  // namespace cairn
