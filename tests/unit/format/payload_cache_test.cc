// PayloadCache and the payload allocator: large payload buffers are used
// again, the cache stays within its bound, and an idle cache empties.
#include "engine/format/payload_cache.h"

#include <gtest/gtest.h>

#include <vector>

#include "engine/format/frame.h"

namespace cairn {
namespace {

constexpr size_t kMiB = 1 << 20;

class PayloadCacheTest : public ::testing::Test {
 protected:
  // Each test starts with an empty cache (two trims: the first may find
  // a buffer taken since the last one).
  void SetUp() override {
    payload_cache::TrimIdle();
    payload_cache::TrimIdle();
    ASSERT_EQ(payload_cache::CachedBytes(), 0u);
  }
};

TEST_F(PayloadCacheTest, AFreedPayloadBufferServesTheNextFrame) {
  const char* first = nullptr;
  {
    Payload p(4 * kMiB);
    first = p.data();
  }
  EXPECT_EQ(payload_cache::CachedBytes(), 4 * kMiB);
  Payload again(4 * kMiB - 100);  // the same 64 KiB size class
  EXPECT_EQ(again.data(), first) << "the freed buffer was not used again";
  EXPECT_EQ(payload_cache::CachedBytes(), 0u);
}

TEST_F(PayloadCacheTest, SmallPayloadsAreNotCached) {
  { Payload p(64 * 1024); }
  EXPECT_EQ(payload_cache::CachedBytes(), 0u);
}

TEST_F(PayloadCacheTest, TheCacheHoldsAtMostItsBound) {
  {
    std::vector<Payload> many;
    for (size_t i = 0; i < payload_cache::kMaxBytes / (4 * kMiB) + 4; ++i) {
      many.emplace_back(4 * kMiB);
    }
  }
  EXPECT_EQ(payload_cache::CachedBytes(), payload_cache::kMaxBytes);
}

TEST_F(PayloadCacheTest, AnIdleCacheGoesBackToTheSystem) {
  { Payload p(8 * kMiB); }
  ASSERT_EQ(payload_cache::CachedBytes(), 8 * kMiB);
  // Taken since the last trim: kept.
  EXPECT_EQ(payload_cache::TrimIdle(), 0u);
  EXPECT_EQ(payload_cache::CachedBytes(), 8 * kMiB);
  // Untouched since: freed.
  EXPECT_EQ(payload_cache::TrimIdle(), 8 * kMiB);
  EXPECT_EQ(payload_cache::CachedBytes(), 0u);
}

TEST_F(PayloadCacheTest, AGrownPayloadKeepsItsBytes) {
  Payload p(300 * 1024);
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<char>(i * 7);
  p.resize(5 * kMiB);  // moves to a larger buffer, the old one cached
  for (size_t i = 0; i < 300 * 1024; ++i) {
    ASSERT_EQ(p[i], static_cast<char>(i * 7)) << "byte " << i;
  }
  EXPECT_EQ(payload_cache::CachedBytes(), 320 * 1024u);
}

}  // namespace
}  // namespace cairn
