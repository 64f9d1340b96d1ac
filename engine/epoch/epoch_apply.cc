// The standby's half of an epoch (see epoch.h): ApplyStream writes
// verified records, ApplyEpoch replays a spool through the verifier, and
// RevertToPoint puts the head back as it is at a restore point.
#include <fmt/format.h>

#include <algorithm>
#include <functional>
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

namespace {

// Writes onto the head of `dst`, sized `size` first, what `src` holds at
// `snap` in the extents src.DiffExtents(diff_from, diff_to) lists, each
// piece read back and checked by XXH3; `written` sees each piece. Zero
// extents are written as zeros unread if `snap` is diff_to (the extents'
// kinds describe it); else every extent is read. One 4 MiB buffer at a
// time.
Status CopyExtents(Volume& src, const std::string& snap, const std::string& diff_from,
                   const std::string& diff_to, Volume& dst, uint64_t size,
                   const std::function<void(std::span<const char>)>& written) {
  const bool kinds_of_snap = snap == diff_to;
  constexpr uint64_t kPiece = 4ull << 20;
  ASSIGN_OR_RETURN(const uint64_t had, dst.Size());
  if (had != size) RETURN_IF_ERROR(dst.Resize(size));
  ASSIGN_OR_RETURN(auto in, src.OpenIo(snap));
  ASSIGN_OR_RETURN(auto out, dst.OpenIo(""));
  std::vector<char> buf;
  std::vector<char> back;
  RETURN_IF_ERROR(src.DiffExtents(diff_from, diff_to, [&](const Extent& e) -> Status {
    for (uint64_t off = e.offset; off < e.offset + e.length;) {
      const uint64_t n = std::min(kPiece, e.offset + e.length - off);
      buf.resize(n);
      if (e.kind == RecordKind::kData || !kinds_of_snap) {
        RETURN_IF_ERROR(in->StartRead(0, off, buf));
        RETURN_IF_ERROR(in->WaitOne().status);
      } else {
        std::fill(buf.begin(), buf.end(), 0);
      }
      RETURN_IF_ERROR(IsAllZero(buf) ? out->StartZero(0, off, n) : out->StartWrite(0, off, buf));
      RETURN_IF_ERROR(out->WaitOne().status);
      back.resize(n);
      RETURN_IF_ERROR(out->StartRead(0, off, back));
      RETURN_IF_ERROR(out->WaitOne().status);
      if (BlockHash::Of(back) != BlockHash::Of(buf)) {
        return DataLoss(fmt::format("{} bytes at offset {} of {} read back other than written", n,
                                    off, dst.name()));
      }
      written(buf);
      off += n;
    }
    return OkStatus();
  }));
  return out->Drain();
}

}  // namespace

StatusOr<uint64_t> RevertToPoint(Volume& target, const SnapInfo& point) {
  ASSIGN_OR_RETURN(const uint64_t size, target.Size());
  uint64_t bytes = std::max(size, point.size) - std::min(size, point.size);
  RETURN_IF_ERROR(CopyExtents(target, point.name, point.name, "", target, point.size,
                              [&](std::span<const char> piece) { bytes += piece.size(); }));
  return bytes;
}

StatusOr<uint64_t> CopyChanges(Volume& src, const SnapInfo& from, const SnapInfo& to, Volume& dst) {
  constexpr uint64_t kCounted = 64ull << 10;  // as an epoch's records count data
  uint64_t bytes = 0;
  RETURN_IF_ERROR(
      CopyExtents(src, to.name, from.name, to.name, dst, to.size, [&](std::span<const char> b) {
        for (uint64_t i = 0; i < b.size(); i += kCounted) {
          const auto part = b.subspan(i, std::min<uint64_t>(kCounted, b.size() - i));
          if (!IsAllZero(part)) bytes += part.size();
        }
      }));
  RETURN_IF_ERROR(src.ConfirmSnap(to.name, to.id));
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
