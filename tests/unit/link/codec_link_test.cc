// CodecLink (engine/link/codec_link.h) over the in-process pair: data
// records leave compressed when that saves an eighth, arrive as the records
// that were sent, byte for byte, and a damaged compressed payload is
// refused as data loss, never handed up as other bytes.
#include "engine/link/codec_link.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using namespace std::chrono_literals;

// Text-like bytes: words from a small vocabulary, as a file system's
// documentation is; lz4 and zstd halve them at least.
std::vector<char> Compressible(size_t n, uint64_t seed) {
  static const std::vector<std::string> kWords = {"replica ", "point ",  "epoch ", "volume ",
                                                  "sink ",    "source ", "\n",     "block "};
  std::mt19937_64 rng(seed);
  std::vector<char> out;
  while (out.size() < n) {
    const std::string& w = kWords[rng() % kWords.size()];
    out.insert(out.end(), w.begin(), w.end());
  }
  out.resize(n);
  return out;
}

std::vector<char> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<char> out(n);
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

class CodecLinkTest : public ::testing::TestWithParam<Compression> {
 protected:
  void SetUp() override {
    auto [a, b] = MakeMemoryLinkPair(32u << 20);
    sender_ = std::make_unique<CodecLink>(std::move(a), GetParam(), &counted_);
    wire_ = std::move(b);
  }
  std::atomic<uint64_t> counted_{0};  // what the sender counts for the source's status
  std::unique_ptr<CodecLink> sender_;
  std::unique_ptr<Link> wire_;  // the receiving end, before any decoding
};

TEST_P(CodecLinkTest, CompressibleRecordsLeaveSmallerAndArriveAsSent) {
  CodecLink receiver(*wire_, Compression::kNone);
  const std::vector<char> data = Compressible(1u << 20, 1);
  ASSERT_TRUE(sender_->Send(FrameType::kRecord, "body-1", data).ok());
  ASSERT_TRUE(sender_->Send(FrameType::kEpochEnd, "end", {}).ok());
  auto f = receiver.Receive(1s);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->type, FrameType::kRecord);
  EXPECT_EQ(f->body, "body-1");
  ASSERT_EQ(f->payload.size(), data.size());
  EXPECT_TRUE(std::equal(data.begin(), data.end(), f->payload.begin()));
  auto end = receiver.Receive(1s);
  ASSERT_TRUE(end.ok());
  EXPECT_EQ(end->type, FrameType::kEpochEnd);
  EXPECT_EQ(sender_->record_bytes(), data.size());
  EXPECT_LT(sender_->wire_bytes(), data.size() / 2) << CompressionName(GetParam());
  EXPECT_EQ(counted_.load(), sender_->wire_bytes());
}

TEST_P(CodecLinkTest, TheWireCarriesACompressedRecordFrame) {
  const std::vector<char> data = Compressible(64 * 1024, 2);
  ASSERT_TRUE(sender_->Send(FrameType::kRecord, "b", data).ok());
  auto f = wire_->Receive(1s);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(f->type, FrameType::kCompressedRecord);
  EXPECT_LT(f->payload.size(), data.size() / 2);
  EXPECT_EQ(static_cast<Compression>(f->payload[0]), GetParam());
}

TEST_P(CodecLinkTest, RandomAndSmallPayloadsLeaveAsTheyAre) {
  CodecLink receiver(*wire_, Compression::kNone);
  const std::vector<char> random = Random(1u << 20, 3);
  const std::vector<char> small = Compressible(kMinCompressedPayload - 1, 4);
  ASSERT_TRUE(sender_->Send(FrameType::kRecord, "r", random).ok());
  ASSERT_TRUE(sender_->Send(FrameType::kRecord, "s", small).ok());
  for (const auto* sent : {&random, &small}) {
    auto f = wire_->Receive(1s);
    ASSERT_TRUE(f.ok());
    EXPECT_EQ(f->type, FrameType::kRecord);
    ASSERT_EQ(f->payload.size(), sent->size());
    EXPECT_TRUE(std::equal(sent->begin(), sent->end(), f->payload.begin()));
  }
  EXPECT_EQ(sender_->wire_bytes(), sender_->record_bytes());
  EXPECT_EQ(counted_.load(), random.size() + small.size());
}

TEST_P(CodecLinkTest, ADamagedCompressedPayloadIsDataLossNotOtherBytes) {
  const std::vector<char> data = Compressible(256 * 1024, 5);
  std::optional<Payload> packed = CompressPayload(GetParam(), data);
  ASSERT_TRUE(packed.has_value());
  // Cut short: the codec runs out of input before the promised length.
  Payload cut(packed->begin(), packed->begin() + static_cast<long>(packed->size() / 2));
  auto r = DecompressPayload(cut);
  EXPECT_EQ(r.status().code(), Code::kDataLoss) << r.status().ToString();
  // A prefix that promises one byte more than the bytes hold.
  Payload longer = *packed;
  longer[4] = static_cast<char>(static_cast<unsigned char>(longer[4]) + 1);
  r = DecompressPayload(longer);
  EXPECT_EQ(r.status().code(), Code::kDataLoss) << r.status().ToString();
  EXPECT_NE(r.status().message().find("do not decode"), std::string::npos);
  // Through a link: the receiver hands up nothing, and says who sent it.
  auto [a, b] = MakeMemoryLinkPair();
  CodecLink receiver(*b, Compression::kNone);
  ASSERT_TRUE(a->Send(FrameType::kCompressedRecord, "x", cut).ok());
  auto f = receiver.Receive(1s);
  EXPECT_EQ(f.status().code(), Code::kDataLoss) << f.status().ToString();
  EXPECT_NE(f.status().message().find(b->peer()), std::string::npos) << f.status().ToString();
}

INSTANTIATE_TEST_SUITE_P(Codecs, CodecLinkTest,
                         ::testing::Values(Compression::kLz4, Compression::kZstd),
                         [](const auto& info) { return std::string(CompressionName(info.param)); });

TEST(CodecTest, UnknownCodecsAndOversizedLengthsAreRefused) {
  Payload p(16, 0);
  p[0] = 9;
  EXPECT_NE(DecompressPayload(p).status().message().find("unknown codec 9"), std::string::npos);
  p[0] = static_cast<char>(Compression::kLz4);
  p[7] = 0x7f;  // a length of about 2 GiB
  EXPECT_NE(DecompressPayload(p).status().message().find("over the limit"), std::string::npos);
  EXPECT_EQ(DecompressPayload(std::span<const char>(p.data(), 3)).status().code(), Code::kDataLoss);
}

TEST(CodecTest, NamesParseBothWays) {
  for (Compression c : {Compression::kNone, Compression::kLz4, Compression::kZstd}) {
    EXPECT_EQ(ParseCompression(CompressionName(c)), c);
  }
  EXPECT_FALSE(ParseCompression("gzip").has_value());
  EXPECT_FALSE(ParseCompression("LZ4").has_value());
}

}  // namespace
}  // namespace cairn
