// Helpers for tests of the Volume seam (engine/volume/volume.h) on any
// store: patterns, windowed reads and writes, whole-image hashes, diff
// collection and its checks. Used by the conformance suite
// (volume_conformance.h) and by tests of one store or layer.
//
// Thread-safety: as the Volume they are given (one thread at a time).
#pragma once

#include <gtest/gtest.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"
#include "engine/volume/volume.h"

#define CAIRN_ASSERT_OK(expr)                               \
  do {                                                      \
    const ::cairn::Status _s = (expr);                      \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s.ToString(); \
  } while (0)

#define CAIRN_EXPECT_OK(expr)                               \
  do {                                                      \
    const ::cairn::Status _s = (expr);                      \
    EXPECT_TRUE(_s.ok()) << #expr << ": " << _s.ToString(); \
  } while (0)

#define CAIRN_EXPECT_CODE(expr, code_)                                   \
  do {                                                                   \
    const ::cairn::Status _s = (expr);                                   \
    EXPECT_EQ(_s.code(), (code_)) << #expr << " gave " << _s.ToString(); \
  } while (0)

// `lhs = value of expr` (a StatusOr), or fails the test.
#define CAIRN_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  CAIRN_ASSERT_OK_AND_ASSIGN_IMPL(CAIRN_CONCAT(_sor_t_, __LINE__), lhs, expr)
#define CAIRN_ASSERT_OK_AND_ASSIGN_IMPL(tmp, lhs, expr)              \
  auto tmp = (expr);                                                 \
  ASSERT_TRUE(tmp.ok()) << #expr << ": " << tmp.status().ToString(); \
  lhs = std::move(tmp).value()

namespace cairn {
namespace volume_test {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr uint64_t kGiB = 1024 * kMiB;
inline constexpr uint64_t kPiece = 1 * kMiB;  // bytes per I/O in the helpers
inline constexpr size_t kWindow = 4;          // I/Os in flight in the helpers

struct Range {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// Deterministic pseudo-random bytes (xorshift64*), different per seed.
inline std::string Pattern(uint64_t seed, size_t n) {
  std::string s(n, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  for (size_t i = 0; i < n; i += 8) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    const uint64_t v = x * 0x2545F4914F6CDD1Dull;
    std::memcpy(&s[i], &v, std::min<size_t>(8, n - i));
  }
  return s;
}

// Starts `n` operations through `io` with at most kWindow in flight, then
// drains. Returns the first error.
inline Status RunWindowed(AsyncIo& io, uint64_t n, const std::function<Status(uint64_t)>& start) {
  Status first;
  for (uint64_t i = 0; i < n; ++i) {
    if (io.InFlight() >= kWindow) {
      AsyncIo::Completion c = io.WaitOne();
      if (first.ok() && !c.status.ok()) first = c.status;
    }
    if (Status s = start(i); !s.ok()) {
      (void)io.Drain();
      return s;
    }
  }
  Status drained = io.Drain();
  return first.ok() ? drained : first;
}

inline uint64_t Pieces(uint64_t length) { return (length + kPiece - 1) / kPiece; }

inline Status WriteAt(Volume& v, uint64_t offset, std::string_view data) {
  ASSIGN_OR_RETURN(std::unique_ptr<AsyncIo> io, v.OpenIo(""));
  return RunWindowed(*io, Pieces(data.size()), [&](uint64_t i) {
    const uint64_t at = i * kPiece;
    const size_t n = std::min<uint64_t>(kPiece, data.size() - at);
    return io->StartWrite(i, offset + at, std::span<const char>(data.data() + at, n));
  });
}

inline Status ZeroAt(Volume& v, uint64_t offset, uint64_t length) {
  ASSIGN_OR_RETURN(std::unique_ptr<AsyncIo> io, v.OpenIo(""));
  RETURN_IF_ERROR(io->StartZero(1, offset, length));
  return io->Drain();
}

inline StatusOr<std::string> ReadAt(Volume& v, const std::string& snap, uint64_t offset,
                                    uint64_t length) {
  ASSIGN_OR_RETURN(std::unique_ptr<AsyncIo> io, v.OpenIo(snap));
  std::string out(length, '\x5a');  // not zeros: a read that does nothing shows
  RETURN_IF_ERROR(RunWindowed(*io, Pieces(length), [&](uint64_t i) {
    const uint64_t at = i * kPiece;
    const size_t n = std::min<uint64_t>(kPiece, length - at);
    return io->StartRead(i, offset + at, std::span<char>(out.data() + at, n));
  }));
  return out;
}

inline StatusOr<uint64_t> SizeAt(Volume& v, const std::string& snap) {
  if (snap.empty()) return v.Size();
  ASSIGN_OR_RETURN(std::vector<SnapInfo> snaps, v.ListSnaps());
  for (const auto& s : snaps) {
    if (s.name == snap) return s.size;
  }
  return NotFound("no snapshot " + snap);
}

// The whole image at `snap` (the head if empty). Small images only.
inline StatusOr<std::string> ReadImage(Volume& v, const std::string& snap) {
  ASSIGN_OR_RETURN(uint64_t size, SizeAt(v, snap));
  return ReadAt(v, snap, 0, size);
}

// XXH3-64 of the whole image at `snap`, read in 4 MiB pieces.
inline StatusOr<uint64_t> HashImage(Volume& v, const std::string& snap) {
  ASSIGN_OR_RETURN(uint64_t size, SizeAt(v, snap));
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  Status st;
  for (uint64_t off = 0; off < size && st.ok(); off += 4 * kMiB) {
    StatusOr<std::string> bytes = ReadAt(v, snap, off, std::min(4 * kMiB, size - off));
    if (!bytes.ok()) {
      st = bytes.status();
    } else {
      XXH3_64bits_update(state, bytes->data(), bytes->size());
    }
  }
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  if (!st.ok()) return st;
  return h;
}

inline StatusOr<std::vector<Extent>> CollectDiff(Volume& v, const std::string& from,
                                                 const std::string& to) {
  std::vector<Extent> out;
  RETURN_IF_ERROR(v.DiffExtents(from, to, [&](const Extent& e) {
    out.push_back(e);
    return OkStatus();
  }));
  return out;
}

inline uint64_t TotalLength(const std::vector<Extent>& extents) {
  uint64_t n = 0;
  for (const auto& e : extents) n += e.length;
  return n;
}

// Bytes of the union of `changes`, each rounded out to `granularity` and
// clipped to `size`: what a diff may list at most (property (b)).
inline uint64_t RoundedOutBytes(const std::vector<Range>& changes, uint64_t granularity,
                                uint64_t size) {
  std::vector<Range> r;
  for (const auto& c : changes) {
    if (c.length == 0) continue;
    const uint64_t lo = c.offset / granularity * granularity;
    const uint64_t hi =
        std::min((c.offset + c.length + granularity - 1) / granularity * granularity, size);
    if (lo < hi) r.push_back({lo, hi - lo});
  }
  std::sort(r.begin(), r.end(), [](const Range& a, const Range& b) { return a.offset < b.offset; });
  uint64_t total = 0;
  uint64_t end = 0;
  for (const auto& x : r) {
    const uint64_t lo = std::max(x.offset, end);
    const uint64_t hi = x.offset + x.length;
    if (hi > lo) total += hi - lo;
    end = std::max(end, hi);
  }
  return total;
}

inline std::string Describe(const std::vector<Extent>& extents) {
  std::string s;
  for (const auto& e : extents) {
    s += std::to_string(e.offset) + "~" + std::to_string(e.length) +
         (e.kind == RecordKind::kData ? "D " : "Z ");
    if (s.size() > 2000) return s + "...";
  }
  return s;
}

// Checks the shape of a diff: ascending, non-overlapping, non-empty, within
// `size`.
inline ::testing::AssertionResult WellFormed(const std::vector<Extent>& extents, uint64_t size) {
  uint64_t end = 0;
  for (const auto& e : extents) {
    if (e.length == 0) return ::testing::AssertionFailure() << "empty extent at " << e.offset;
    if (e.offset < end) {
      return ::testing::AssertionFailure() << "extent at " << e.offset << " overlaps or is out of "
                                           << "order; extents: " << Describe(extents);
    }
    if (e.offset + e.length > size) {
      return ::testing::AssertionFailure()
             << "extent " << e.offset << "~" << e.length << " beyond the size " << size;
    }
    end = e.offset + e.length;
  }
  return ::testing::AssertionSuccess();
}

// Properties (a) and (b) for the diff from `from` to `to`. `changes` are the
// ranges written, zeroed or cut by a resize between the two points.
inline ::testing::AssertionResult DiffReconstructs(Volume& v, const std::string& from,
                                                   const std::string& to,
                                                   const std::vector<Range>& changes,
                                                   uint64_t granularity,
                                                   std::vector<Extent>* listed = nullptr) {
  StatusOr<std::vector<Extent>> extents = CollectDiff(v, from, to);
  if (!extents.ok()) return ::testing::AssertionFailure() << extents.status().ToString();
  StatusOr<uint64_t> to_size = SizeAt(v, to);
  if (!to_size.ok()) return ::testing::AssertionFailure() << to_size.status().ToString();
  if (auto r = WellFormed(*extents, *to_size); !r) return r;

  StatusOr<std::string> target = ReadImage(v, to);
  if (!target.ok()) return ::testing::AssertionFailure() << target.status().ToString();
  std::string image;
  if (!from.empty()) {
    StatusOr<std::string> base = ReadImage(v, from);
    if (!base.ok()) return ::testing::AssertionFailure() << base.status().ToString();
    image = std::move(*base);
  }
  image.resize(*to_size, '\0');
  for (const auto& e : *extents) {
    if (e.kind == RecordKind::kData) {
      std::memcpy(image.data() + e.offset, target->data() + e.offset, e.length);
    } else {
      std::memset(image.data() + e.offset, 0, e.length);
    }
  }
  if (XXH3_64bits(image.data(), image.size()) != XXH3_64bits(target->data(), target->size())) {
    uint64_t first = 0;
    while (first < image.size() && image[first] == (*target)[first]) ++first;
    return ::testing::AssertionFailure()
           << "applying the diff " << (from.empty() ? "(empty)" : from) << " -> "
           << (to.empty() ? "(head)" : to) << " onto the old image does not give the new one; "
           << "first difference at byte " << first << "; extents: " << Describe(*extents);
  }
  const uint64_t bound = RoundedOutBytes(changes, granularity, *to_size);
  if (TotalLength(*extents) > bound) {
    return ::testing::AssertionFailure()
           << "diff lists " << TotalLength(*extents) << " bytes, more than the " << bound
           << " bytes changed (rounded out to " << granularity
           << "); extents: " << Describe(*extents);
  }
  if (listed != nullptr) *listed = std::move(*extents);
  return ::testing::AssertionSuccess();
}

// True if the union of the extents of `kind` covers [offset, offset+length).
inline bool Covers(const std::vector<Extent>& extents, RecordKind kind, uint64_t offset,
                   uint64_t length) {
  uint64_t pos = offset;
  for (const auto& e : extents) {
    if (e.kind != kind || e.offset > pos) continue;
    if (e.offset + e.length > pos) pos = e.offset + e.length;
    if (pos >= offset + length) return true;
  }
  return pos >= offset + length;
}

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace volume_test

}  // namespace cairn
