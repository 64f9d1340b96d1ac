// Tests of the spool file: round trips through io_uring and O_DIRECT (and the
// buffered fallback), Sync points, and crash images: unsynced data dropped,
// torn tails, flipped bytes, wrong files. Errors are checked by exact text.

#include "engine/spool/spool.h"

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <unistd.h>
#include <xxhash.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace cairn {
namespace {

namespace fs = std::filesystem;

constexpr size_t kBlock = 4096;

::testing::AssertionResult StatusIs(const Status& st, Code code, std::string_view message) {
  if (st.code() == code && st.message() == message) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << st.ToString() << "\nwant " << Status(code, std::string(message)).ToString();
}

uint64_t RoundUp(uint64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// Deterministic bytes, different for each seed, rarely zero runs.
std::string Pattern(size_t n, uint64_t seed) {
  std::string s(n, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    s[i] = static_cast<char>(x | 1);
  }
  return s;
}

struct TestFrame {
  FrameType type;
  std::string body;
  Payload payload;

  uint64_t size() const { return kFrameHeaderSize + body.size() + payload.size(); }
};

TestFrame MakeFrame(FrameType type, size_t body_len, size_t payload_len, uint64_t seed) {
  std::string p = Pattern(payload_len, seed * 2 + 1);
  return TestFrame{type, Pattern(body_len, seed * 2), Payload(p.begin(), p.end())};
}

Status AppendFrame(SpoolWriter& w, const TestFrame& f) {
  const auto header = EncodeHeader(f.type, f.body, static_cast<uint32_t>(f.payload.size()));
  return w.Append(header, f.body, f.payload);
}

uint64_t TotalSize(const std::vector<TestFrame>& frames, size_t n) {
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += frames[i].size();
  return total;
}

// Everything a reader returns: the frames, the offset after each, then the
// status that ended the reading.
struct ReadBack {
  std::vector<Frame> frames;
  std::vector<uint64_t> offsets;
  Status end;
};

ReadBack ReadAll(const fs::path& path, const SpoolIdentity& expect) {
  ReadBack r;
  auto reader = SpoolReader::Open(path, expect);
  if (!reader.ok()) {
    r.end = reader.status();
    return r;
  }
  for (;;) {
    StatusOr<Frame> f = (*reader)->Next();
    if (!f.ok()) {
      r.end = f.status();
      // The end is sticky.
      EXPECT_EQ((*reader)->Next().status().ToString(), r.end.ToString());
      return r;
    }
    r.frames.push_back(std::move(f).value());
    r.offsets.push_back((*reader)->offset());
  }
}

// Checks that `got` holds exactly the first `n` frames of `want`.
void ExpectFrames(const ReadBack& got, const std::vector<TestFrame>& want, size_t n) {
  ASSERT_EQ(got.frames.size(), n) << "reading ended with " << got.end.ToString();
  uint64_t off = 0;
  for (size_t i = 0; i < n; ++i) {
    SCOPED_TRACE(fmt::format("frame {}", i));
    EXPECT_EQ(got.frames[i].type, want[i].type);
    EXPECT_TRUE(got.frames[i].body == want[i].body);
    EXPECT_TRUE(got.frames[i].payload == want[i].payload);
    off += want[i].size();
    EXPECT_EQ(got.offsets[i], off);
  }
}

void FlipByte(const fs::path& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << path;
  f.seekg(static_cast<std::streamoff>(offset));
  char c = 0;
  f.read(&c, 1);
  ASSERT_TRUE(f) << "offset " << offset;
  c ^= 0x01;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
  ASSERT_TRUE(f);
}

void WriteBytes(const fs::path& path, uint64_t offset, std::string_view bytes) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << path;
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f);
}

std::string ReadFileBytes(const fs::path& path, size_t n) {
  std::ifstream f(path, std::ios::binary);
  std::string s(n, '\0');
  f.read(s.data(), static_cast<std::streamsize>(n));
  s.resize(static_cast<size_t>(f.gcount()));
  return s;
}

class SpoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name =
        fmt::format("cairn-spool-{}-{}.{}", ::getpid(), info->test_suite_name(), info->name());
    for (char& c : name) {
      if (c == '/') c = '_';
    }
    dir_ = fs::path(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") / name;
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = dir_ / "e7.spool";
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes `frames` and Syncs; returns the logical length.
  uint64_t WriteSynced(const std::vector<TestFrame>& frames,
                       const SpoolOptions& options = SmallBuffers()) {
    auto w = SpoolWriter::Create(path_, id_, options);
    EXPECT_TRUE(w.ok()) << w.status().ToString();
    if (!w.ok()) return 0;
    for (const TestFrame& f : frames) EXPECT_TRUE(AppendFrame(**w, f).ok());
    StatusOr<uint64_t> len = (*w)->Sync();
    EXPECT_TRUE(len.ok()) << len.status().ToString();
    return len.ok() ? *len : 0;
  }

  static SpoolOptions SmallBuffers() {
    SpoolOptions o;
    o.buffer_bytes = 64 << 10;
    return o;
  }

  fs::path dir_;
  fs::path path_;
  const SpoolIdentity id_{"rbd/vm1", 7};
};

// Five frames of distinct sizes, for the corruption tests.
std::vector<TestFrame> FiveFrames() {
  return {MakeFrame(FrameType::kEpochBegin, 40, 0, 1), MakeFrame(FrameType::kRecord, 60, 4096, 2),
          MakeFrame(FrameType::kRecord, 60, 100, 3), MakeFrame(FrameType::kRecord, 60, 70000, 4),
          MakeFrame(FrameType::kEpochEnd, 50, 0, 5)};
}

// ---------------------------------------------------------------------------
// Round trips, over staging buffer sizes and with or without O_DIRECT.

struct WriterParams {
  size_t buffer_bytes;
  bool direct_io;
};

void PrintTo(const WriterParams& p, std::ostream* os) {
  *os << p.buffer_bytes << " byte buffers, " << (p.direct_io ? "O_DIRECT" : "buffered");
}

class SpoolRoundTripTest : public SpoolTest, public ::testing::WithParamInterface<WriterParams> {
 protected:
  SpoolOptions Options() const {
    SpoolOptions o;
    o.buffer_bytes = GetParam().buffer_bytes;
    o.direct_io = GetParam().direct_io;
    return o;
  }
};

TEST_P(SpoolRoundTripTest, VariedFrameSizes) {
  const std::vector<TestFrame> frames = {
      MakeFrame(FrameType::kEpochBegin, 20, 0, 1),
      MakeFrame(FrameType::kRecord, 0, 0, 2),
      MakeFrame(FrameType::kRecord, 1, 1, 3),
      MakeFrame(FrameType::kRecord, 50, 4095, 4),
      MakeFrame(FrameType::kRecord, 50, 4096, 5),
      MakeFrame(FrameType::kRecord, 50, 4097, 6),
      MakeFrame(FrameType::kRecord, 100, (1 << 20) + 7, 7),
      MakeFrame(FrameType::kRecord, 17, 5 << 20, 8),  // larger than the default staging buffer
      MakeFrame(FrameType::kRecord, kMaxBody, 3, 9),
      MakeFrame(FrameType::kRecord, 33, kMaxPayload, 10),
      MakeFrame(FrameType::kEpochEnd, 30, 0, 11),
  };
  auto w = SpoolWriter::Create(path_, id_, Options());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  for (const TestFrame& f : frames) ASSERT_TRUE(AppendFrame(**w, f).ok());
  const uint64_t total = TotalSize(frames, frames.size());
  EXPECT_EQ((*w)->appended(), total);
  StatusOr<uint64_t> len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, total);
  EXPECT_EQ(fs::file_size(path_), kSpoolHeaderSize + RoundUp(total));

  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, frames.size());
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolRoundTripTest, SyncMidwayRewritesThePartialBlock) {
  std::vector<TestFrame> frames;
  for (int i = 0; i < 12; ++i)
    frames.push_back(MakeFrame(FrameType::kRecord, 40 + i, 1000 * i + 3, i));
  auto w = SpoolWriter::Create(path_, id_, Options());
  ASSERT_TRUE(w.ok()) << w.status().ToString();

  for (int i = 0; i < 5; ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
  StatusOr<uint64_t> len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  ASSERT_EQ(*len, TotalSize(frames, 5));
  ASSERT_NE(*len % kBlock, 0u) << "the test wants a partial last block";
  EXPECT_EQ(fs::file_size(path_), kSpoolHeaderSize + RoundUp(*len));

  // A Sync with nothing new changes nothing.
  len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, TotalSize(frames, 5));
  EXPECT_EQ(fs::file_size(path_), kSpoolHeaderSize + RoundUp(*len));

  for (size_t i = 5; i < frames.size(); ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
  len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, TotalSize(frames, frames.size()));
  EXPECT_EQ(fs::file_size(path_) % kBlock, 0u);
  EXPECT_EQ(fs::file_size(path_), kSpoolHeaderSize + RoundUp(*len));
  w->reset();

  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, frames.size());
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolRoundTripTest, RandomFramesAndSyncs) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(fmt::format("seed {}", seed));
  std::mt19937_64 rng(seed);
  auto w = SpoolWriter::Create(path_, id_, Options());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::vector<TestFrame> frames;
  for (int i = 0; i < 300; ++i) {
    const size_t body = rng() % 200;
    const size_t payload = rng() % 4 == 0 ? rng() % 40000 : rng() % 5000;
    frames.push_back(MakeFrame(FrameType::kRecord, body, payload, rng()));
    ASSERT_TRUE(AppendFrame(**w, frames.back()).ok());
    if (rng() % 3 == 0) {
      StatusOr<uint64_t> len = (*w)->Sync();
      ASSERT_TRUE(len.ok()) << len.status().ToString();
      ASSERT_EQ(*len, TotalSize(frames, frames.size()));
      ASSERT_EQ(fs::file_size(path_), kSpoolHeaderSize + RoundUp(*len));
    }
  }
  ASSERT_TRUE((*w)->Sync().ok());
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, frames.size());
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

INSTANTIATE_TEST_SUITE_P(Buffers, SpoolRoundTripTest,
                         ::testing::Values(WriterParams{4096, true}, WriterParams{64 << 10, true},
                                           WriterParams{4 << 20, true},
                                           WriterParams{64 << 10, false},
                                           WriterParams{4 << 20, false}),
                         [](const ::testing::TestParamInfo<WriterParams>& p) {
                           return fmt::format("{}K_{}", p.param.buffer_bytes >> 10,
                                              p.param.direct_io ? "direct" : "buffered");
                         });

// ---------------------------------------------------------------------------
// Layout and edges.

TEST_F(SpoolTest, EmptySpoolEndsAtOnce) {
  auto w = SpoolWriter::Create(path_, id_, SmallBuffers());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  StatusOr<uint64_t> len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, 0u);
  EXPECT_EQ(fs::file_size(path_), kSpoolHeaderSize);
  ReadBack r = ReadAll(path_, id_);
  EXPECT_TRUE(r.frames.empty());
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_F(SpoolTest, HeaderLayoutIsPinned) {
  WriteSynced({});
  const std::string h = ReadFileBytes(path_, kSpoolHeaderSize);
  ASSERT_EQ(h.size(), kSpoolHeaderSize);
  const std::string vol = "rbd/vm1";
  std::string want;
  want += "CAIRNSPL";
  want += std::string("\x01\x00\x00\x00", 4);                  // version 1
  want += std::string("\x29\x00\x00\x00", 4);                  // header_len 34 + 7
  want += std::string("\x07\x00\x00\x00\x00\x00\x00\x00", 8);  // seq 7
  want += std::string("\x07\x00", 2);                          // volume_len 7
  want += vol;
  const uint64_t sum = XXH3_64bits(want.data(), want.size());
  for (int i = 0; i < 8; ++i) want.push_back(static_cast<char>(sum >> (8 * i)));
  ASSERT_EQ(want.size(), 41u);
  EXPECT_EQ(h.substr(0, want.size()), want);
  EXPECT_EQ(h.substr(want.size()), std::string(kSpoolHeaderSize - want.size(), '\0'));
}

TEST_F(SpoolTest, FramesFollowTheHeaderExactlyAsGiven) {
  const std::vector<TestFrame> frames = FiveFrames();
  const uint64_t len = WriteSynced(frames);
  std::string want;
  for (const TestFrame& f : frames) {
    want += EncodeFrame(f.type, f.body, f.payload);
  }
  ASSERT_EQ(len, want.size());
  const std::string file = ReadFileBytes(path_, kSpoolHeaderSize + RoundUp(len));
  EXPECT_TRUE(file.substr(kSpoolHeaderSize, len) == want);
  EXPECT_EQ(file.substr(kSpoolHeaderSize + len), std::string(RoundUp(len) - len, '\0'));
}

TEST_F(SpoolTest, PaddingShorterThanAFrameHeaderEndsCleanly) {
  // 10 bytes of padding before the block boundary, then EOF.
  const size_t payload = 2 * kBlock - 10 - kFrameHeaderSize - 8;
  const std::vector<TestFrame> frames = {MakeFrame(FrameType::kRecord, 8, payload, 1)};
  ASSERT_EQ(WriteSynced(frames) % kBlock, kBlock - 10);
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 1);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_F(SpoolTest, UnsyncedFullBuffersStillReachTheFile) {
  // Destroying a writer with writes in flight waits for them; the partial
  // buffer is dropped, so the last frame it held reads as torn.
  std::vector<TestFrame> frames;
  for (int i = 0; i < 6; ++i) frames.push_back(MakeFrame(FrameType::kRecord, 30, 50000, i));
  {
    auto w = SpoolWriter::Create(path_, id_, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (const TestFrame& f : frames) ASSERT_TRUE(AppendFrame(**w, f).ok());
  }
  const uint64_t total = TotalSize(frames, frames.size());
  const uint64_t written = total / (64 << 10) * (64 << 10);
  EXPECT_EQ(fs::file_size(path_), kSpoolHeaderSize + written);
  size_t whole = 0;
  while (whole < frames.size() && TotalSize(frames, whole + 1) <= written) ++whole;
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, whole);
  const uint64_t at = TotalSize(frames, whole);
  EXPECT_TRUE(StatusIs(r.end, Code::kDataLoss,
                       fmt::format("torn or corrupt frame at spool offset {}: truncated frame: "
                                   "wanted 50000 bytes, {} left",
                                   at, written - at - kFrameHeaderSize - 30)));
}

// ---------------------------------------------------------------------------
// Crash images.

TEST_F(SpoolTest, CrashDropsWhatWasNotSynced_CopyAtSync) {
  std::vector<TestFrame> frames;
  for (int i = 0; i < 10; ++i) frames.push_back(MakeFrame(FrameType::kRecord, 20, 9000 * i + 5, i));
  const fs::path image = dir_ / "image.spool";
  {
    auto w = SpoolWriter::Create(path_, id_, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < 4; ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
    // What stable storage holds at this instant.
    fs::copy_file(path_, image);
    for (size_t i = 4; i < frames.size(); ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
  }
  ReadBack r = ReadAll(image, id_);
  ExpectFrames(r, frames, 4);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_F(SpoolTest, CrashDropsWhatWasNotSynced_TruncateToSyncedSize) {
  // After the Sync, full staging buffers were written (rewriting the synced
  // partial block with the next frame's start); the crash loses every
  // block after the synced ones. The synced frames read back, then the
  // frame that straddles the cut is torn, at exactly the synced length.
  std::vector<TestFrame> frames = {MakeFrame(FrameType::kRecord, 20, 3000, 0),
                                   MakeFrame(FrameType::kRecord, 20, 5000, 1),
                                   MakeFrame(FrameType::kRecord, 10, 10000, 2)};
  for (int i = 3; i < 12; ++i) frames.push_back(MakeFrame(FrameType::kRecord, 20, 30000, i));
  uint64_t synced = 0;
  {
    auto w = SpoolWriter::Create(path_, id_, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < 2; ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
    StatusOr<uint64_t> len = (*w)->Sync();
    ASSERT_TRUE(len.ok()) << len.status().ToString();
    synced = *len;
    for (size_t i = 2; i < frames.size(); ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
  }
  ASSERT_GT(fs::file_size(path_), kSpoolHeaderSize + RoundUp(synced));
  fs::resize_file(path_, kSpoolHeaderSize + RoundUp(synced));
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 2);
  const uint64_t left = RoundUp(synced) - synced - kFrameHeaderSize - 10;
  EXPECT_TRUE(StatusIs(r.end, Code::kDataLoss,
                       fmt::format("torn or corrupt frame at spool offset {}: truncated frame: "
                                   "wanted 10000 bytes, {} left",
                                   synced, left)));
}

TEST_F(SpoolTest, TornTailInPayload) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 3);  // frame 3: body 60, payload 70000
  fs::resize_file(path_, kSpoolHeaderSize + at + kFrameHeaderSize + 60 + 1234);
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 3);
  EXPECT_TRUE(StatusIs(r.end, Code::kDataLoss,
                       fmt::format("torn or corrupt frame at spool offset {}: truncated frame: "
                                   "wanted 70000 bytes, 1234 left",
                                   at)));
}

TEST_F(SpoolTest, TornTailInBody) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 4);  // frame 4: body 50, no payload
  fs::resize_file(path_, kSpoolHeaderSize + at + kFrameHeaderSize + 7);
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 4);
  EXPECT_TRUE(StatusIs(
      r.end, Code::kDataLoss,
      fmt::format(
          "torn or corrupt frame at spool offset {}: truncated frame: wanted 50 bytes, 7 left",
          at)));
}

TEST_F(SpoolTest, TornTailInFrameHeader) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 4);
  fs::resize_file(path_, kSpoolHeaderSize + at + 10);
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 4);
  EXPECT_TRUE(StatusIs(
      r.end, Code::kDataLoss,
      fmt::format(
          "torn or corrupt frame at spool offset {}: truncated frame: wanted 32 bytes, 10 left",
          at)));
}

TEST_F(SpoolTest, FlippedBodyByte) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 2);
  FlipByte(path_, kSpoolHeaderSize + at + kFrameHeaderSize + 17);
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 2);
  EXPECT_TRUE(StatusIs(
      r.end, Code::kDataLoss,
      fmt::format(
          "torn or corrupt frame at spool offset {}: frame body checksum mismatch (Record frame)",
          at)));
}

TEST_F(SpoolTest, FlippedFrameHeaderByte) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 3);
  for (uint64_t i = 4; i < kFrameHeaderSize; ++i) {  // every byte after the magic
    SCOPED_TRACE(fmt::format("header byte {}", i));
    FlipByte(path_, kSpoolHeaderSize + at + i);
    ReadBack r = ReadAll(path_, id_);
    ExpectFrames(r, frames, 3);
    EXPECT_TRUE(StatusIs(
        r.end, Code::kDataLoss,
        fmt::format("torn or corrupt frame at spool offset {}: frame header checksum mismatch",
                    at)));
    FlipByte(path_, kSpoolHeaderSize + at + i);  // restore
  }
  ExpectFrames(ReadAll(path_, id_), frames, frames.size());
}

TEST_F(SpoolTest, FlippedFrameMagic) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 1);
  FlipByte(path_, kSpoolHeaderSize + at);  // 'C' 0x43 -> 0x42
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 1);
  EXPECT_TRUE(StatusIs(
      r.end, Code::kDataLoss,
      fmt::format("torn or corrupt frame at spool offset {}: bad frame magic 0x4e524142", at)));
}

TEST_F(SpoolTest, ZeroedFrameHeaderEndsTheData) {
  // A whole zero frame header is indistinguishable from padding: the data
  // ends there (what follows it was never acknowledged as a frame).
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  WriteBytes(path_, kSpoolHeaderSize + TotalSize(frames, 2), std::string(kFrameHeaderSize, '\0'));
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, 2);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_F(SpoolTest, FlippedSpoolHeaderByte) {
  WriteSynced(FiveFrames());
  const size_t header_len = 34 + id_.volume.size();
  for (uint64_t i = 8; i < header_len; ++i) {
    SCOPED_TRACE(fmt::format("spool header byte {}", i));
    FlipByte(path_, i);
    EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, id_).status(), Code::kDataLoss,
                         "spool header checksum mismatch"));
    FlipByte(path_, i);
  }
  for (uint64_t i = 0; i < 8; ++i) {
    SCOPED_TRACE(fmt::format("magic byte {}", i));
    FlipByte(path_, i);
    EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, id_).status(), Code::kDataLoss,
                         fmt::format("not a Cairn spool file: {}", path_.string())));
    FlipByte(path_, i);
  }
  EXPECT_TRUE(SpoolReader::Open(path_, id_).ok());
}

TEST_F(SpoolTest, OtherSpoolVersionIsFailedPrecondition) {
  WriteSynced({});
  // A well-formed header of version 2: checksum recomputed.
  std::string h = ReadFileBytes(path_, 41);
  h[8] = 2;
  const uint64_t sum = XXH3_64bits(h.data(), 33);
  for (int i = 0; i < 8; ++i) h[33 + i] = static_cast<char>(sum >> (8 * i));
  WriteBytes(path_, 0, h);
  EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, id_).status(), Code::kFailedPrecondition,
                       "unsupported spool version 2 (this build reads 1)"));
}

TEST_F(SpoolTest, WrongIdentity) {
  WriteSynced(FiveFrames());
  EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, SpoolIdentity{"rbd/vm2", 7}).status(),
                       Code::kDataLoss,
                       "spool belongs to volume rbd/vm1 epoch 7, expected rbd/vm2 epoch 7"));
  EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, SpoolIdentity{"rbd/vm1", 8}).status(),
                       Code::kDataLoss,
                       "spool belongs to volume rbd/vm1 epoch 7, expected rbd/vm1 epoch 8"));
  // An empty expected volume skips the check and reports what the file holds.
  auto reader = SpoolReader::Open(path_, SpoolIdentity{});
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->identity().volume, "rbd/vm1");
  EXPECT_EQ((*reader)->identity().seq, 7u);
}

TEST_F(SpoolTest, NotASpoolFile) {
  { std::ofstream(path_) << ""; }
  EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, id_).status(), Code::kDataLoss,
                       fmt::format("not a Cairn spool file: {}", path_.string())));
  { std::ofstream(path_) << std::string(8192, 'x'); }
  EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, id_).status(), Code::kDataLoss,
                       fmt::format("not a Cairn spool file: {}", path_.string())));
  { std::ofstream(path_) << "CAIRNSPL" << std::string(92, '\0'); }
  EXPECT_TRUE(StatusIs(SpoolReader::Open(path_, id_).status(), Code::kDataLoss,
                       "spool header truncated: 100 of 4096 bytes"));
  EXPECT_EQ(SpoolReader::Open(dir_ / "absent.spool", id_).status().code(), Code::kNotFound);
}

TEST_F(SpoolTest, LongestVolumeName) {
  const SpoolIdentity id{std::string(256, 'v'), 1};
  auto w = SpoolWriter::Create(path_, id, SmallBuffers());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_TRUE((*w)->Sync().ok());
  auto reader = SpoolReader::Open(path_, id);
  ASSERT_TRUE(reader.ok()) << reader.status().ToString();
  EXPECT_EQ((*reader)->identity().volume, id.volume);

  EXPECT_TRUE(StatusIs(SpoolWriter::Create(path_, SpoolIdentity{std::string(257, 'v'), 1}).status(),
                       Code::kInvalidArgument, "spool volume name too long: 257 bytes (max 256)"));
}

TEST_F(SpoolTest, BadBufferSize) {
  SpoolOptions o;
  o.buffer_bytes = 6000;
  EXPECT_TRUE(StatusIs(SpoolWriter::Create(path_, id_, o).status(), Code::kInvalidArgument,
                       "spool buffer_bytes must be a multiple of 4096 between 4096 and 1073741824, "
                       "got 6000"));
}

// ---------------------------------------------------------------------------
// Environment errors.

TEST_F(SpoolTest, MissingDirectoryIsFailedPrecondition) {
  const fs::path missing = dir_ / "no-such-dir";
  const fs::path path = missing / "e7.spool";
  EXPECT_TRUE(
      StatusIs(SpoolWriter::Create(path, id_).status(), Code::kFailedPrecondition,
               fmt::format("spool directory missing: {} (creating spool {}: No such file or "
                           "directory)",
                           missing.string(), path.string())));
}

TEST_F(SpoolTest, DirectoryIsAFileIsFailedPrecondition) {
  const fs::path file = dir_ / "file";
  { std::ofstream(file) << "x"; }
  const fs::path path = file / "e7.spool";
  EXPECT_TRUE(
      StatusIs(SpoolWriter::Create(path, id_).status(), Code::kFailedPrecondition,
               fmt::format("spool directory missing: {} (creating spool {}: Not a directory)",
                           file.string(), path.string())));
}

TEST_F(SpoolTest, DiskFullIsResourceExhausted) {
  // /dev/full fails every write with ENOSPC. It also refuses O_DIRECT, so
  // the direct case goes through the buffered fallback first.
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct" : "buffered");
    SpoolOptions o = SmallBuffers();
    o.direct_io = direct;
    const Status st = SpoolWriter::Create("/dev/full", id_, o).status();
    EXPECT_TRUE(StatusIs(st, Code::kResourceExhausted,
                         "spool disk full: writing spool /dev/full at offset 0: No space left on "
                         "device (errno 28)"));
    EXPECT_EQ(st.reason(), Reason::kSpoolDiskFull);
  }
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

// Resume after a torn tail: the verified prefix stays, the torn bytes go,
// and new frames follow it exactly.
TEST_F(SpoolTest, ResumeAfterATornTailKeepsThePrefixAndAppends) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 3);
  fs::resize_file(path_, kSpoolHeaderSize + at + kFrameHeaderSize + 60 + 1234);  // torn frame 3
  ReadBack torn = ReadAll(path_, id_);
  ASSERT_EQ(torn.offsets.size(), 3u);
  ASSERT_EQ(torn.offsets.back(), at);

  auto w = SpoolWriter::Resume(path_, at, SmallBuffers());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::vector<TestFrame> want(frames.begin(), frames.begin() + 3);
  want.push_back(MakeFrame(FrameType::kRecord, 33, 5000, 9));
  want.push_back(MakeFrame(FrameType::kEpochEnd, 20, 0, 10));
  for (size_t i = 3; i < want.size(); ++i) ASSERT_TRUE(AppendFrame(**w, want[i]).ok());
  auto len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, TotalSize(want, want.size()));
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, want, want.size());
  EXPECT_EQ(r.end.code(), Code::kAborted) << r.end.ToString();
  EXPECT_EQ(fs::file_size(path_) % 4096, 0u);
}

// Resume where garbage longer than the new data follows the resume point:
// none of it may be read back as frames.
TEST_F(SpoolTest, ResumeDiscardsEverythingAfterTheResumePoint) {
  const std::vector<TestFrame> frames = FiveFrames();
  WriteSynced(frames);
  const uint64_t at = TotalSize(frames, 1);
  auto w = SpoolWriter::Resume(path_, at, SmallBuffers());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::vector<TestFrame> want = {frames[0], MakeFrame(FrameType::kEpochEnd, 10, 0, 11)};
  ASSERT_TRUE(AppendFrame(**w, want[1]).ok());
  ASSERT_TRUE((*w)->Sync().ok());
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, want, 2);
  EXPECT_EQ(r.end.code(), Code::kAborted) << r.end.ToString();
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

// [sink] spool_max_bytes: the frame that would take the file past the limit
// is refused with an exact error, and the writer stays usable: what was
// appended before is synced and reads back whole.
TEST_F(SpoolTest, QuotaRefusesTheFrameThatWouldPassItAndKeepsTheRest) {
  SpoolOptions o = SmallBuffers();
  o.max_bytes = 64 << 10;
  auto w = SpoolWriter::Create(path_, id_, o);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  std::vector<TestFrame> frames;
  Status refused;
  for (uint64_t i = 0; i < 100 && refused.ok(); ++i) {
    frames.push_back(MakeFrame(FrameType::kRecord, 40, 10000, i));
    refused = AppendFrame(**w, frames.back());
  }
  ASSERT_FALSE(refused.ok());
  frames.pop_back();
  // Frames of 10072 bytes: 4096 + 6 * 10072 rounds up to 64 KiB, a seventh passes it.
  ASSERT_EQ(frames.size(), 6u);
  EXPECT_TRUE(StatusIs(
      refused, Code::kResourceExhausted,
      fmt::format("spool quota exceeded: spool {} would grow to {} bytes, over the limit of {} "
                  "bytes",
                  path_.string(), RoundUp(kSpoolHeaderSize + 7 * frames[0].size()), 64 << 10)));
  EXPECT_EQ(refused.reason(), Reason::kSpoolQuota);
  EXPECT_EQ(refused.Annotate("receiving").reason(), Reason::kSpoolQuota);
  auto len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, TotalSize(frames, frames.size()));
  ReadBack r = ReadAll(path_, id_);
  ExpectFrames(r, frames, frames.size());
  EXPECT_LE(fs::file_size(path_), 64u << 10);
}

// Restores the file size limit and SIGXFSZ on scope exit.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    getrlimit(RLIMIT_FSIZE, &saved_);
    old_handler_ = std::signal(SIGXFSZ, SIG_IGN);
    rlimit r = saved_;
    r.rlim_cur = bytes;
    ok_ = setrlimit(RLIMIT_FSIZE, &r) == 0;
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &saved_);
    std::signal(SIGXFSZ, old_handler_);
  }
  bool ok() const { return ok_; }

 private:
  rlimit saved_{};
  void (*old_handler_)(int) = nullptr;
  bool ok_ = false;
};

// A disk that fills up mid-epoch (emulated with RLIMIT_FSIZE, which makes
// the kernel write short and then refuse, as a full disk does; the real
// ENOSPC is in tests/integration/test_outages.py): the writer
// fails, SyncWritten makes what reached the file durable, the whole frames
// in it read back as a verified prefix, and Resume continues after them.
TEST_F(SpoolTest, FullDiskMidEpochKeepsTheWrittenPrefixForResume) {
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "O_DIRECT" : "buffered");
    SpoolOptions o = SmallBuffers();
    o.direct_io = direct;
    std::vector<TestFrame> frames = {MakeFrame(FrameType::kEpochBegin, 40, 0, 1)};
    for (uint64_t i = 0; i < 20; ++i) {
      frames.push_back(MakeFrame(FrameType::kRecord, 60, 20000, i + 2));
    }
    frames.push_back(MakeFrame(FrameType::kEpochEnd, 50, 0, 99));
    const rlim_t limit = 160 << 10;  // room for the header and ~7.7 records
    Status failed;
    {
      auto w = SpoolWriter::Create(path_, id_, o);
      ASSERT_TRUE(w.ok()) << w.status().ToString();
      FileSizeLimit full(limit);
      ASSERT_TRUE(full.ok());
      for (const TestFrame& f : frames) {
        failed = AppendFrame(**w, f);
        if (!failed.ok()) break;
      }
      if (failed.ok()) failed = (*w)->Sync().status();
      ASSERT_FALSE(failed.ok()) << "the file grew past RLIMIT_FSIZE";
      EXPECT_TRUE((*w)->SyncWritten().ok());
      EXPECT_FALSE((*w)->Sync().ok()) << "the writer stays failed";
    }
    // The write that crosses the limit is short, the next one refused
    // (EFBIG); either may complete first.
    EXPECT_EQ(failed.code(), Code::kResourceExhausted) << failed.ToString();
    EXPECT_THAT(failed.message(),
                ::testing::AnyOf(::testing::StartsWith("spool disk full: "),
                                 ::testing::StartsWith("spool file too large: ")));
    EXPECT_LE(fs::file_size(path_), limit);
    // The whole frames that reached the file read back; the torn tail ends them.
    ReadBack r = ReadAll(path_, id_);
    ASSERT_GE(r.frames.size(), 2u) << r.end.ToString();
    ASSERT_LT(r.frames.size(), frames.size());
    ExpectFrames(r, frames, r.frames.size());
    const size_t kept = r.frames.size();
    auto w = SpoolWriter::Resume(path_, r.offsets.back(), o);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (size_t i = kept; i < frames.size(); ++i) ASSERT_TRUE(AppendFrame(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
    ReadBack all = ReadAll(path_, id_);
    ExpectFrames(all, frames, frames.size());
    EXPECT_EQ(all.end.code(), Code::kAborted) << all.end.ToString();
    fs::remove(path_);
  }
}

}  // namespace
}  // namespace cairn
