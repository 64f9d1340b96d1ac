#include "engine/base/checksum.h"

#include <gtest/gtest.h>

namespace cairn {
namespace {

TEST(Checksum, BlockHashIsXxh3_64) {
  const std::string s = "hello";
  EXPECT_EQ(BlockHash::Of(s).value(), XXH3_64bits(s.data(), s.size()));
  EXPECT_NE(BlockHash::Of(s), BlockHash::Of(std::string("hellp")));
}

// The block hash may run through the AVX2/AVX-512 dispatcher: a sink on one
// CPU must agree with a source on another, so it must equal the portable
// XXH3-64 on every length class XXH3 treats apart (0, 1-3, 4-8, 9-16,
// 17-128, 129-240, the striped long loop with its tail) and at unaligned
// starts.
TEST(Checksum, BlockHashEqualsPortableXxh3OnEveryLengthAndAlignment) {
  std::string data(1 << 20 | 7, '\0');
  uint64_t x = 0x9e3779b97f4a7c15ull;
  for (char& c : data) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    c = static_cast<char>(x);
  }
  for (size_t len : {0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1023, 1024, 1025, 4096, 65535,
                     65536, 1 << 20}) {
    for (size_t start : {0, 1, 7}) {
      const std::span<const char> s(data.data() + start, len);
      EXPECT_EQ(BlockHash::Of(s).value(), XXH3_64bits(s.data(), s.size()))
          << "length " << len << " at offset " << start;
    }
  }
}

TEST(Checksum, EpochDigestCoversEveryField) {
  auto digest = [](uint64_t seq, uint64_t size, uint64_t off, uint64_t len, RecordKind k,
                   uint64_t h) {
    EpochHasher e(seq, size);
    e.Add(off, len, k, BlockHash(h));
    return e.Finish();
  };
  const EpochDigest base = digest(1, 100, 0, 10, RecordKind::kData, 7);
  EXPECT_EQ(base, digest(1, 100, 0, 10, RecordKind::kData, 7));
  EXPECT_NE(base, digest(2, 100, 0, 10, RecordKind::kData, 7));
  EXPECT_NE(base, digest(1, 101, 0, 10, RecordKind::kData, 7));
  EXPECT_NE(base, digest(1, 100, 1, 10, RecordKind::kData, 7));
  EXPECT_NE(base, digest(1, 100, 0, 11, RecordKind::kData, 7));
  EXPECT_NE(base, digest(1, 100, 0, 10, RecordKind::kZero, 7));
  EXPECT_NE(base, digest(1, 100, 0, 10, RecordKind::kData, 8));
  EXPECT_EQ(base.ToHex().size(), 32u);
}

TEST(Checksum, ChainBindsHistory) {
  EpochHasher e(1, 10);
  const EpochDigest d = e.Finish();
  const ChainDigest c1 = NextChain(ChainDigest(), d, 1);
  EXPECT_FALSE(c1.IsZero());
  EXPECT_NE(c1, NextChain(ChainDigest(), d, 2));
  EXPECT_NE(NextChain(c1, d, 2), NextChain(ChainDigest(), d, 2));
  ChainDigest back;
  ASSERT_TRUE(ChainDigest::FromString(c1.AsBytes(), &back));
  EXPECT_EQ(back, c1);
  EXPECT_FALSE(ChainDigest::FromString("short", &back));
}

}  // namespace
}  // namespace cairn
