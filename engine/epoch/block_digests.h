// Block digests: how two sites compare an image without shipping it.
//
// An image is cut into grains of kDigestGrain bytes; each grain has a
// GrainDigest: XXH3-128 of its bytes, or all zeros if they all read as
// zeros (so a hole and written zeros compare equal, and either side can
// digest a range it knows unallocated without reading it). A digest that
// XXH3 makes all zeros is sent with its last byte set to 1, at both ends.
//
// A resync epoch (a source whose base snapshot is lost) asks the sink for
// the digests of its base point, window by window, as it reads its own
// snapshot in the same order (BaseDigests), and sends only the grains
// whose digests differ. The sink answers from its point's snapshot
// (DigestRange): what the standby image's head holds when the epoch
// begins, so a grain not sent is one the head already holds.
//
// Memory: one window's digests at the source (16 bytes per grain: 16 KiB
// per 64 MiB window); DigestRange reads through a fixed window of buffers.
//
// Thread-safety: none; one epoch is handled by one thread.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "engine/base/checksum.h"
#include "engine/base/status.h"
#include "engine/volume/volume.h"

namespace cairn {

// The grain digests compare: a 4 KiB write costs one grain.
inline constexpr uint32_t kDigestGrain = 64 * 1024;
// A source asks for this much of the base's digests at a time: 1024
// grains, 16 KiB of digests per round trip.
inline constexpr uint64_t kDigestWindow = 64u << 20;

struct GrainDigestTag {};
using GrainDigest = Digest128<GrainDigestTag>;

// The digest of one grain's bytes (all zeros: the zero digest).
GrainDigest DigestOfGrain(std::span<const char> bytes);

// The source's view of the base's digests, fetched as it goes.
class BaseDigests {
 public:
  virtual ~BaseDigests() = default;
  // The packed digests (16 bytes per grain) of [offset, offset + length)
  // of the base, clipped to `image_size`. REQUIRES: offset a multiple of
  // `grain`.
  virtual StatusOr<std::string> Fetch(uint64_t offset, uint64_t length, uint32_t grain,
                                      uint64_t image_size) = 0;
};

// Looks up the base's digest of each grain in ascending order, fetching
// kDigestWindow at a time (one window held).
class DigestCursor {
 public:
  DigestCursor(BaseDigests& base, uint64_t image_size) : base_(base), image_size_(image_size) {}
  // The base's digest of the grain that starts at `offset`. REQUIRES:
  // offset a multiple of kDigestGrain, below image_size; not below the
  // window of the previous call.
  StatusOr<GrainDigest> At(uint64_t offset);
  // Grains fetched so far.
  uint64_t grains() const { return grains_; }

 private:
  BaseDigests& base_;
  const uint64_t image_size_;
  uint64_t window_start_ = 0;
  std::string window_;  // packed digests of the window at window_start_
  uint64_t grains_ = 0;
};

// The sink's half: the packed digests of `vol` at snapshot `snap` over
// [offset, offset + length) clipped to `image_size`, reading through `io`
// (opened at `snap`). Bytes past `snap_size` (the snapshot's own size)
// read as zeros without being read. Checks the request's shape first
// (kInvalidArgument: a source that asks for what no epoch needs).
StatusOr<std::string> DigestRange(AsyncIo& io, uint64_t snap_size, uint64_t offset, uint64_t length,
                                  uint32_t grain, uint64_t image_size);

}  // namespace cairn
