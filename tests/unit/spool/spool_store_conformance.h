// The SpoolStore conformance suite: value-parameterized tests that every
// SpoolStore must pass (FileSpoolStore, MemorySpoolStore and a
// FaultSpoolStore with no fault over each: tests/unit/spool/spool_store_test.cc).
// Errors are checked by exact text; every store names a spool
// <where()>/<volume>/<seq>.spool in them.
//
// Usage: include this header in exactly ONE .cc of a test binary (it
// defines the TEST_Ps), then INSTANTIATE_TEST_SUITE_P(Name,
// SpoolStoreConformanceTest, ::testing::Values(SpoolStoreParam{...}),
// SpoolStoreParamName).
//
// Thread-safety: tests run on gtest's thread.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/format/frame.h"
#include "engine/spool/spool_store.h"

namespace cairn {

// What one instantiation of the suite tests.
struct SpoolStoreTarget {
  std::shared_ptr<SpoolStore> store;
  // Flips one byte of a spool's bytes at `offset` (from the file's start).
  std::function<void(const std::string& volume, uint64_t seq, uint64_t offset)> flip;
};

struct SpoolStoreParam {
  std::string label;  // the instantiation's name in test output
  std::function<SpoolStoreTarget()> make;
};

inline void PrintTo(const SpoolStoreParam& p, std::ostream* os) { *os << p.label; }

inline std::string SpoolStoreParamName(const ::testing::TestParamInfo<SpoolStoreParam>& info) {
  return info.param.label;
}

namespace spool_store_test {

inline ::testing::AssertionResult StatusIs(const Status& st, Code code, std::string_view message) {
  if (st.code() == code && st.message() == message) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << st.ToString() << "\nwant " << Status(code, std::string(message)).ToString();
}

// One frame's bytes, distinct per seed.
struct TestFrame {
  std::string body;
  std::string payload;
  uint64_t size() const { return kFrameHeaderSize + body.size() + payload.size(); }
};

inline TestFrame MakeFrame(size_t body_len, size_t payload_len, uint64_t seed) {
  auto fill = [](size_t n, uint64_t x) {
    std::string s(n, '\0');
    x = x * 0x9E3779B97F4A7C15ull + 1;
    for (char& c : s) {
      x ^= x << 13;
      x ^= x >> 7;
      x ^= x << 17;
      c = static_cast<char>(x | 1);
    }
    return s;
  };
  return TestFrame{fill(body_len, seed * 2), fill(payload_len, seed * 2 + 1)};
}

inline Status Append(SpoolWriter& w, const TestFrame& f) {
  const auto header =
      EncodeHeader(FrameType::kRecord, f.body, static_cast<uint32_t>(f.payload.size()));
  return w.Append(header, f.body, f.payload);
}

inline uint64_t Total(const std::vector<TestFrame>& frames, size_t n) {
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += frames[i].size();
  return total;
}

// The frames a spool reads back, and the status that ended the reading.
struct ReadBack {
  std::vector<Frame> frames;
  Status end;
};

inline ReadBack ReadAll(SpoolStore& store, const std::string& volume, uint64_t seq) {
  ReadBack r;
  auto reader = store.Open(volume, seq);
  if (!reader.ok()) {
    r.end = reader.status();
    return r;
  }
  for (;;) {
    StatusOr<Frame> f = (*reader)->Next();
    if (!f.ok()) {
      r.end = f.status();
      return r;
    }
    r.frames.push_back(std::move(f).value());
  }
}

// `got` holds exactly the first `n` frames of `want`.
inline void ExpectFrames(const ReadBack& got, const std::vector<TestFrame>& want, size_t n) {
  ASSERT_EQ(got.frames.size(), n) << "reading ended with " << got.end.ToString();
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(got.frames[i].body, want[i].body) << "frame " << i;
    EXPECT_TRUE(std::string_view(got.frames[i].payload.data(), got.frames[i].payload.size()) ==
                want[i].payload)
        << "frame " << i;
  }
}

inline SpoolOptions SmallBuffers() {
  SpoolOptions o;
  o.buffer_bytes = 16 << 10;
  return o;
}

}  // namespace spool_store_test

class SpoolStoreConformanceTest : public ::testing::TestWithParam<SpoolStoreParam> {
 protected:
  void SetUp() override {
    target_ = GetParam().make();
    ASSERT_NE(target_.store, nullptr);
  }
  SpoolStore& store() { return *target_.store; }
  std::string PathOf(const std::string& volume, uint64_t seq) {
    return (std::filesystem::path(store().where()) / volume / fmt::format("{}.spool", seq))
        .string();
  }
  // Creates (volume, seq) holding `frames`, synced.
  void Write(const std::string& volume, uint64_t seq,
             const std::vector<spool_store_test::TestFrame>& frames) {
    auto w = store().Create(volume, seq, spool_store_test::SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (const auto& f : frames) ASSERT_TRUE(spool_store_test::Append(**w, f).ok());
    StatusOr<uint64_t> len = (*w)->Sync();
    ASSERT_TRUE(len.ok()) << len.status().ToString();
    EXPECT_EQ(*len, spool_store_test::Total(frames, frames.size()));
  }

  SpoolStoreTarget target_;
};

namespace spool_store_test {

inline std::vector<TestFrame> SomeFrames(size_t n, uint64_t seed) {
  std::vector<TestFrame> frames;
  for (size_t i = 0; i < n; ++i) frames.push_back(MakeFrame(10 + i, 7000 * i + 3, seed + i));
  return frames;
}

}  // namespace spool_store_test

TEST_P(SpoolStoreConformanceTest, FramesReadBackAfterSync) {
  using namespace spool_store_test;
  const auto frames = SomeFrames(8, 1);  // past two 16 KiB staging buffers
  Write("vol1", 7, frames);
  ReadBack r = ReadAll(store(), "vol1", 7);
  ExpectFrames(r, frames, frames.size());
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolStoreConformanceTest, ListsSeqsAscendingAndVolumesThatHaveSpools) {
  using namespace spool_store_test;
  EXPECT_TRUE(store().Volumes()->empty());
  EXPECT_TRUE(store().List("vol1")->empty());
  for (uint64_t seq : {12, 3, 1}) Write("vol1", seq, SomeFrames(1, seq));
  Write("vol2", 5, SomeFrames(1, 5));
  EXPECT_EQ(*store().List("vol1"), (std::vector<uint64_t>{1, 3, 12}));
  EXPECT_EQ(*store().List("vol2"), (std::vector<uint64_t>{5}));
  EXPECT_TRUE(store().List("vol3")->empty());
  EXPECT_EQ(*store().Volumes(), (std::vector<std::string>{"vol1", "vol2"}));
  ASSERT_TRUE(store().Remove("vol1", 3).ok());
  ASSERT_TRUE(store().Remove("vol1", 3).ok());  // gone already: still OK
  ASSERT_TRUE(store().Remove("vol2", 5).ok());
  EXPECT_EQ(*store().List("vol1"), (std::vector<uint64_t>{1, 12}));
  EXPECT_EQ(*store().Volumes(), (std::vector<std::string>{"vol1"}));
  EXPECT_TRUE(StatusIs(
      store().Open("vol1", 3).status(), Code::kNotFound,
      fmt::format("opening spool {}: No such file or directory (errno 2)", PathOf("vol1", 3))));
}

TEST_P(SpoolStoreConformanceTest, CreateReplacesAnEarlierSpoolOfTheEpoch) {
  using namespace spool_store_test;
  Write("vol1", 2, SomeFrames(5, 10));
  const auto second = SomeFrames(2, 20);
  Write("vol1", 2, second);
  ReadBack r = ReadAll(store(), "vol1", 2);
  ExpectFrames(r, second, 2);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolStoreConformanceTest, ResumeAppendsAfterTheGivenEndAndDropsTheRest) {
  using namespace spool_store_test;
  const auto frames = SomeFrames(4, 30);
  Write("vol1", 4, frames);
  const TestFrame extra = MakeFrame(9, 5000, 99);
  {
    auto w = store().Resume("vol1", 4, Total(frames, 2), SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    EXPECT_EQ((*w)->appended(), Total(frames, 2));
    ASSERT_TRUE(Append(**w, extra).ok());
    StatusOr<uint64_t> len = (*w)->Sync();
    ASSERT_TRUE(len.ok()) << len.status().ToString();
    EXPECT_EQ(*len, Total(frames, 2) + extra.size());
  }
  ReadBack r = ReadAll(store(), "vol1", 4);
  ExpectFrames(r, {frames[0], frames[1], extra}, 3);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolStoreConformanceTest, ResumeRefusesAMissingOrShortSpool) {
  using namespace spool_store_test;
  EXPECT_TRUE(StatusIs(
      store().Resume("vol1", 4, 100, SmallBuffers()).status(), Code::kFailedPrecondition,
      fmt::format("spool directory missing: {} (re-opening spool {}: No such file or directory)",
                  (std::filesystem::path(store().where()) / "vol1").string(), PathOf("vol1", 4))));
  const auto frames = SomeFrames(1, 40);  // 4 KiB of frames after the header
  Write("vol1", 4, frames);
  EXPECT_TRUE(
      StatusIs(store().Resume("vol1", 4, 10000, SmallBuffers()).status(), Code::kDataLoss,
               fmt::format("spool {} is shorter than its resume point 10000", PathOf("vol1", 4))));
}

TEST_P(SpoolStoreConformanceTest, QuotaRefusesTheFrameAndTheWriterSyncsOn) {
  using namespace spool_store_test;
  SpoolOptions o = SmallBuffers();
  o.max_bytes = 3 * 4096;
  auto w = store().Create("vol1", 1, o);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  const auto frames = SomeFrames(3, 50);  // 45, 7046 and 14047 bytes
  ASSERT_TRUE(Append(**w, frames[0]).ok());
  ASSERT_TRUE(Append(**w, frames[1]).ok());
  const Status refused = Append(**w, frames[2]);
  EXPECT_TRUE(StatusIs(refused, Code::kResourceExhausted,
                       fmt::format("spool quota exceeded: spool {} would grow to 28672 bytes, "
                                   "over the limit of 12288 bytes",
                                   PathOf("vol1", 1))));
  EXPECT_EQ(refused.reason(), Reason::kSpoolQuota);
  StatusOr<uint64_t> len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, Total(frames, 2));
  ExpectFrames(ReadAll(store(), "vol1", 1), frames, 2);
}

TEST_P(SpoolStoreConformanceTest, RefusesBadArguments) {
  using namespace spool_store_test;
  SpoolOptions o;
  o.buffer_bytes = 1000;
  EXPECT_TRUE(StatusIs(store().Create("vol1", 1, o).status(), Code::kInvalidArgument,
                       "spool buffer_bytes must be a multiple of 4096 between 4096 and "
                       "1073741824, got 1000"));
  EXPECT_TRUE(StatusIs(store().Resume("vol1", 1, 0, o).status(), Code::kInvalidArgument,
                       "spool buffer_bytes must be a multiple of 4096"));
  EXPECT_TRUE(StatusIs(store().Create(std::string(257, 'v'), 1, SmallBuffers()).status(),
                       Code::kInvalidArgument, "spool volume name too long: 257 bytes (max 256)"));
}

TEST_P(SpoolStoreConformanceTest, AFlippedByteReadsAsCorruption) {
  using namespace spool_store_test;
  const auto frames = SomeFrames(3, 60);
  Write("vol1", 3, frames);
  target_.flip("vol1", 3, kSpoolHeaderSize + Total(frames, 1) + kFrameHeaderSize + 2);
  ReadBack r = ReadAll(store(), "vol1", 3);
  ExpectFrames(r, frames, 1);
  EXPECT_TRUE(StatusIs(r.end, Code::kDataLoss,
                       fmt::format("torn or corrupt frame at spool offset {}: frame body "
                                   "checksum mismatch (Record frame)",
                                   Total(frames, 1))));
  target_.flip("vol1", 3, 30);  // in the volume name
  EXPECT_TRUE(StatusIs(store().Open("vol1", 3).status(), Code::kDataLoss,
                       "spool header checksum mismatch"));
}

TEST_P(SpoolStoreConformanceTest, HasRoomAndIsWritable) {
  EXPECT_GT(store().FreeBytes(), 0u);
  EXPECT_TRUE(store().CheckWritable("vol1").ok());
  EXPECT_TRUE(store().CheckWritable("").ok());
  EXPECT_TRUE(store().List("vol1")->empty());  // the probe is not a spool
  EXPECT_TRUE(store().AddVolume("vol2").ok());
  EXPECT_TRUE(store().AddVolume("vol2").ok());  // there already: OK
  EXPECT_TRUE(store().List("vol2")->empty());
  EXPECT_TRUE(store().Volumes()->empty());  // a volume without spools is not listed
}

}  // namespace cairn
