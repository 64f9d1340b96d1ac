#include "engine/format/frame.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "engine/epoch/epoch.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;

TEST(Frame, RoundTrip) {
  const std::string payload = "some block bytes";
  const std::string bytes = EncodeFrame(FrameType::kRecord, "body!", payload);
  ASSERT_EQ(bytes.size(), kFrameHeaderSize + 5 + payload.size());
  StringSource src(bytes);
  auto f = ReadFrame(src);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->type, FrameType::kRecord);
  EXPECT_EQ(f->body, "body!");
  EXPECT_EQ(std::string(f->payload.begin(), f->payload.end()), payload);
  EXPECT_EQ(ReadFrame(src).status().code(), Code::kAborted);  // clean end
}

TEST(Frame, EmptyBodyAndPayload) {
  const std::string bytes = EncodeFrame(FrameType::kHello, "");
  StringSource src(bytes);
  auto f = ReadFrame(src);
  ASSERT_TRUE(f.ok());
  EXPECT_TRUE(f->body.empty());
  EXPECT_TRUE(f->payload.empty());
}

// A data record frame of epoch 1, as the source sends it.
std::string RecordFrame(const std::string& payload) {
  pb::Record r;
  r.set_index(0);
  r.set_offset(4096);
  r.set_length(payload.size());
  r.set_kind(pb::DATA);
  r.set_xxh3(BlockHash::Of(payload).value());
  r.set_seq(1);
  return EncodeFrame(FrameType::kRecord, r.SerializeAsString(), payload);
}

std::string BeginFrame() {
  pb::EpochBegin b;
  b.set_volume("v");
  b.set_seq(1);
  b.set_image_size(1 << 20);
  b.set_max_block(1 << 20);
  return EncodeFrame(FrameType::kEpochBegin, b.SerializeAsString());
}

// Reads `bytes` as one record frame and checks it against an epoch.
Status ReadAndVerify(const std::string& bytes) {
  EpochVerifier v("v", 0, ChainDigest());
  const std::string begin_bytes = BeginFrame();
  StringSource begin_src(begin_bytes);
  auto begin = ReadFrame(begin_src);
  EXPECT_TRUE(begin.ok());
  EXPECT_TRUE(v.Check(*begin).ok());
  StringSource src(bytes);
  auto f = ReadFrame(src);
  if (!f.ok()) return f.status();
  return v.Check(*f).status();
}

// Every byte of a frame is covered: a flipped bit anywhere gives the exact
// error of the layer that owns that byte.
TEST(Frame, EveryFlippedByteGivesItsExactError) {
  const std::string payload(700, 'x');
  const std::string good = RecordFrame(payload);
  ASSERT_TRUE(ReadAndVerify(good).ok());
  StringSource probe(good);
  ASSERT_TRUE(ReadFrame(probe).ok());
  const size_t body_len = good.size() - kFrameHeaderSize - payload.size();
  for (size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] ^= 0x10;
    const Status st = ReadAndVerify(bad);
    ASSERT_EQ(st.code(), Code::kDataLoss) << "byte " << i << ": " << st.ToString();
    if (i < 4) {
      EXPECT_THAT(st.message(), HasSubstr("bad frame magic")) << i;
    } else if (i < kFrameHeaderSize) {
      EXPECT_EQ(st.message(), "frame header checksum mismatch") << i;
    } else if (i < kFrameHeaderSize + body_len) {
      EXPECT_EQ(st.message(), "frame body checksum mismatch (Record frame)") << i;
    } else {
      EXPECT_EQ(st.message(), "block checksum mismatch at offset 4096 (record 0)") << i;
    }
  }
}

TEST(Frame, TruncationAnywhereIsDataLoss) {
  const std::string good = RecordFrame(std::string(100, 'y'));
  for (size_t n = 1; n < good.size(); ++n) {
    StringSource src(std::string_view(good).substr(0, n));
    auto f = ReadFrame(src);
    ASSERT_FALSE(f.ok()) << n;
    EXPECT_EQ(f.status().code(), Code::kDataLoss) << n;
    EXPECT_THAT(f.status().message(), HasSubstr("truncated frame")) << n;
  }
}

TEST(Frame, OtherVersionIsAClearPreconditionError) {
  // Re-seal a header with version 2 so only the version differs.
  std::string bytes = EncodeFrame(FrameType::kHello, "x");
  bytes[4] = 2;
  const uint64_t h = XXH3_64bits(bytes.data(), 24);
  std::memcpy(bytes.data() + 24, &h, 8);
  StringSource src(bytes);
  auto f = ReadFrame(src);
  EXPECT_EQ(f.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(f.status().message(), HasSubstr("unsupported frame version 2"));
}

TEST(Frame, OversizedLengthsAreRefused) {
  std::string bytes = EncodeFrame(FrameType::kRecord, "x");
  const uint32_t huge = kMaxPayload + 1;
  std::memcpy(bytes.data() + 12, &huge, 4);
  const uint64_t h = XXH3_64bits(bytes.data(), 24);
  std::memcpy(bytes.data() + 24, &h, 8);
  StringSource src(bytes);
  EXPECT_THAT(ReadFrame(src).status().message(), HasSubstr("frame payload too large"));
}

}  // namespace
}  // namespace cairn
