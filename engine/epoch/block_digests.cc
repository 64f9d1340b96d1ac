// Block digests (block_digests.h): the grain digest, the source's cursor
// over the base's digests and the sink's answer from its snapshot.
#include "engine/epoch/block_digests.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <vector>

#include "engine/epoch/zeros.h"

namespace cairn {
namespace {

// Digests one request may ask for: 256 KiB of reply.
constexpr uint64_t kMaxGrainsPerRequest = 16384;
// DigestRange reads this much at a time, this many reads in flight.
constexpr uint64_t kReadChunk = 4u << 20;
constexpr size_t kReadsInFlight = 4;

void Append(std::string* out, const GrainDigest& d) {
  out->append(reinterpret_cast<const char*>(d.bytes().data()), GrainDigest::kSize);
}

}  // namespace

GrainDigest DigestOfGrain(std::span<const char> bytes) {
  if (IsAllZero(bytes)) return GrainDigest();
  GrainDigest d = GrainDigest::FromXxh(XXH3_128bits(bytes.data(), bytes.size()));
  if (!d.IsZero()) return d;
  std::array<uint8_t, GrainDigest::kSize> one{};
  one.back() = 1;
  return GrainDigest::FromBytes(one);
}

StatusOr<GrainDigest> DigestCursor::At(uint64_t offset) {
  assert(offset % kDigestGrain == 0 && offset < image_size_ && offset >= window_start_);
  uint64_t index = (offset - window_start_) / kDigestGrain;
  if (window_.empty() || index * GrainDigest::kSize >= window_.size()) {
    window_start_ = offset;
    const uint64_t length = std::min(kDigestWindow, image_size_ - offset);
    ASSIGN_OR_RETURN(window_, base_.Fetch(offset, length, kDigestGrain, image_size_));
    const uint64_t want = (length + kDigestGrain - 1) / kDigestGrain;
    if (window_.size() != want * GrainDigest::kSize) {
      return DataLoss(fmt::format("the base's digests of [{}, +{}) hold {} bytes, not {}", offset,
                                  length, window_.size(), want * GrainDigest::kSize));
    }
    grains_ += want;
    index = 0;
  }
  std::array<uint8_t, GrainDigest::kSize> b;
  std::memcpy(b.data(), window_.data() + index * GrainDigest::kSize, b.size());
  return GrainDigest::FromBytes(b);
}

namespace {

Status CheckDigestRequest(uint64_t offset, uint64_t length, uint32_t grain, uint64_t image_size) {
  const bool shaped = grain >= 4096 && grain <= kReadChunk && (grain & (grain - 1)) == 0 &&
                      offset % grain == 0 && length > 0 && offset < image_size &&
                      length <= image_size - offset &&
                      (length % grain == 0 || offset + length == image_size) &&
                      length <= kMaxGrainsPerRequest * grain;  // grain <= 4 MiB: no overflow
  if (shaped) return OkStatus();
  return InvalidArgument(
      fmt::format("a digest request for [{}, +{}) in grains of {} bytes of an image of {} bytes "
                  "is out of shape",
                  offset, length, grain, image_size));
}

}  // namespace

StatusOr<std::string> DigestRange(AsyncIo& io, uint64_t snap_size, uint64_t offset, uint64_t length,
                                  uint32_t grain, uint64_t image_size) {
  RETURN_IF_ERROR(CheckDigestRequest(offset, length, grain, image_size));
  const uint64_t end = offset + length;
  const uint64_t readable = std::min(end, std::max(offset, snap_size));
  // Chunks of whole grains, read up to kReadsInFlight at a time and
  // digested in order.
  const uint64_t chunk = kReadChunk / grain * grain;
  const uint64_t chunks = readable > offset ? (readable - offset + chunk - 1) / chunk : 0;
  std::vector<std::vector<char>> bufs(std::min<uint64_t>(chunks, kReadsInFlight));
  std::vector<bool> done(bufs.size(), false);
  std::string out;
  out.reserve((length + grain - 1) / grain * GrainDigest::kSize);
  uint64_t started = 0;
  auto start = [&](uint64_t c) -> Status {
    const uint64_t at = offset + c * chunk;
    std::vector<char>& b = bufs[c % bufs.size()];
    b.resize(std::min(chunk, readable - at));
    done[c % bufs.size()] = false;
    return io.StartRead(c, at, std::span<char>(b.data(), b.size()));
  };
  Status first;
  for (uint64_t c = 0; c < chunks && first.ok(); ++c) {
    while (started < chunks && started < c + bufs.size()) {
      first = start(started++);
      if (!first.ok()) break;
    }
    while (first.ok() && !done[c % bufs.size()]) {
      AsyncIo::Completion got = io.WaitOne();
      if (!got.status.ok()) first = got.status.Annotate("reading the base point for its digests");
      done[got.tag % bufs.size()] = true;
    }
    if (!first.ok()) break;
    const std::vector<char>& b = bufs[c % bufs.size()];
    for (size_t pos = 0; pos < b.size(); pos += grain) {
      // The grain's bytes past the snapshot's size read as zeros.
      const uint64_t at = offset + c * chunk + pos;
      const uint64_t want = std::min<uint64_t>(grain, end - at);
      const uint64_t have = std::min<uint64_t>(want, b.size() - pos);
      GrainDigest d = DigestOfGrain(std::span<const char>(b.data() + pos, have));
      if (have < want && !d.IsZero()) {
        std::vector<char> padded(b.data() + pos, b.data() + pos + have);
        padded.resize(want, 0);
        d = DigestOfGrain(padded);
      }
      Append(&out, d);
    }
  }
  while (io.InFlight() > 0) (void)io.WaitOne();
  RETURN_IF_ERROR(first);
  // Grains wholly past the snapshot's size (one that straddles it was
  // digested above).
  const uint64_t from = (readable + grain - 1) / grain * grain;
  const uint64_t past = from < end ? (end - from + grain - 1) / grain : 0;
  for (uint64_t i = 0; i < past; ++i) Append(&out, GrainDigest());
  return out;
}

}  // namespace cairn
