// Helpers shared by the unit tests: whole-image hashing and random I/O on
// any Volume.
#pragma once

#include <gtest/gtest.h>
#include <xxhash.h>

#include <random>
#include <string>
#include <vector>

#include "engine/base/checksum.h"
#include "engine/volume/volume.h"

namespace cairn::testing {

// XXH3-128 of the whole image at `snap` (head if empty), read in 1 MiB
// chunks: the content, independent of how it is stored.
inline std::string ImageHash(Volume& vol, const std::string& snap, uint64_t size) {
  auto io = vol.OpenIo(snap);
  EXPECT_TRUE(io.ok()) << io.status().ToString();
  if (!io.ok()) return "";
  XXH3_state_t* st = XXH3_createState();
  XXH3_128bits_reset(st);
  std::vector<char> buf(1 << 20);
  for (uint64_t off = 0; off < size; off += buf.size()) {
    const uint64_t n = std::min<uint64_t>(buf.size(), size - off);
    EXPECT_TRUE((*io)->StartRead(0, off, std::span<char>(buf.data(), n)).ok());
    auto c = (*io)->WaitOne();
    EXPECT_TRUE(c.status.ok()) << c.status.ToString();
    XXH3_128bits_update(st, buf.data(), n);
  }
  const std::string h = EpochDigest::FromXxh(XXH3_128bits_digest(st)).ToHex();
  XXH3_freeState(st);
  return h + "/" + std::to_string(size);
}

inline void Write(Volume& vol, uint64_t off, const std::string& data) {
  auto io = vol.OpenIo("");
  ASSERT_TRUE(io.ok()) << io.status().ToString();
  ASSERT_TRUE((*io)->StartWrite(0, off, std::span<const char>(data.data(), data.size())).ok());
  auto c = (*io)->WaitOne();
  ASSERT_TRUE(c.status.ok()) << c.status.ToString();
}

inline void Zero(Volume& vol, uint64_t off, uint64_t len) {
  auto io = vol.OpenIo("");
  ASSERT_TRUE(io.ok());
  ASSERT_TRUE((*io)->StartZero(0, off, len).ok());
  auto c = (*io)->WaitOne();
  ASSERT_TRUE(c.status.ok()) << c.status.ToString();
}

inline std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng() & 0xff);
  return s;
}

// Random writes, zero-writes and zero-filled data between two points.
inline void RandomChanges(Volume& vol, std::mt19937_64& rng, uint64_t size, int ops) {
  for (int i = 0; i < ops; ++i) {
    const uint64_t len = 1 + rng() % (256 * 1024);
    const uint64_t off = rng() % (size - std::min(size - 1, len));
    const uint64_t n = std::min(len, size - off);
    switch (rng() % 4) {
      case 0:
        Zero(vol, off, n);
        break;
      case 1:
        Write(vol, off, std::string(n, '\0'));
        break;
      default:
        Write(vol, off, RandomBytes(rng, n));
        break;
    }
  }
}

// The id of `snap` of `vol`, 0 (and a failure) if there is none.
inline uint64_t MustSnapId(Volume& vol, const std::string& snap) {
  auto snaps = vol.ListSnaps();
  EXPECT_TRUE(snaps.ok()) << snaps.status().ToString();
  if (snaps.ok()) {
    for (const auto& s : *snaps) {
      if (s.name == snap) return s.id;
    }
  }
  ADD_FAILURE() << "no snapshot " << snap << " of " << vol.name();
  return 0;
}

}  // namespace cairn::testing

namespace cairn::testing {

// Opens an image that the test knows exists.
inline std::unique_ptr<Volume> MustOpen(Pool& pool, const std::string& image) {
  auto v = pool.Open(image);
  EXPECT_TRUE(v.ok()) << v.status().ToString();
  return v.ok() ? std::move(v).value() : nullptr;
}

}  // namespace cairn::testing
