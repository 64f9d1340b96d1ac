// Epoch building and applying over the in-memory volume, through a real
// spool file: what the source sends, applied at the sink, must equal the
// source snapshot by whole-image hash.
#include "engine/epoch/epoch.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string_view>
#include <tuple>
#include <vector>

#include "engine/catalog/catalog.h"
#include "engine/epoch/block_digests.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;
using testing::ImageHash;
using testing::Write;
using testing::Zero;

constexpr uint64_t kMiB = 1 << 20;

// Spools frames to a file, like the sink.
class SpoolFrameWriter final : public FrameWriter {
 public:
  explicit SpoolFrameWriter(std::unique_ptr<SpoolWriter> w) : w_(std::move(w)) {}
  Status Write(FrameType type, std::string_view body, std::span<const char> payload) override {
    const auto h = EncodeHeader(type, body, static_cast<uint32_t>(payload.size()));
    ++frames;
    return w_->Append(h, body, payload);
  }
  SpoolWriter& writer() { return *w_; }
  int frames = 0;

 private:
  std::unique_ptr<SpoolWriter> w_;
};

class EpochTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("cairn-epoch-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Ships epoch `seq` (from `base` to `seq`) of `src` and applies it to
  // `dst`. Returns the summary the sink verified.
  StatusOr<EpochSummary> Ship(Volume& src, Volume& dst, uint64_t base, uint64_t seq,
                              TargetState state, SendOptions send = {}, ApplyOptions apply = {}) {
    EpochPlan plan;
    plan.id.volume = "vol";
    plan.id.seq = seq;
    plan.id.base_seq = base;
    plan.from_snap = base && !send.base ? SnapName(base) : "";
    plan.resync = send.base != nullptr;
    plan.to_snap = SnapName(seq);
    ASSIGN_OR_RETURN(auto snaps, src.ListSnaps());
    for (auto& s : snaps) {
      if (s.name == plan.to_snap) {
        plan.id.image_size = s.size;
        plan.to_snap_id = s.id;
      }
      if (s.name == plan.from_snap) plan.from_snap_id = s.id;
    }
    plan.prev_chain = chain_;
    const auto path = dir_ / (std::to_string(seq) + ".spool");
    ASSIGN_OR_RETURN(auto w, SpoolWriter::Create(path, {"vol", seq}));
    SpoolFrameWriter out(std::move(w));
    ASSIGN_OR_RETURN(EpochSummary sent, SendEpoch(src, plan, send, out));
    RETURN_IF_ERROR(out.writer().Sync().status());
    ASSIGN_OR_RETURN(auto reader, SpoolReader::Open(path, {"vol", seq}));
    EpochVerifier verifier("vol", base, chain_);
    ASSIGN_OR_RETURN(EpochSummary got, ApplyEpoch(*reader, verifier, dst, apply, state));
    EXPECT_EQ(got.epoch_digest, sent.epoch_digest);
    EXPECT_EQ(got.chain, sent.chain);
    chain_ = got.chain;
    return got;
  }

  std::filesystem::path dir_;
  ChainDigest chain_;
  MemoryPool pool_;
};

TEST_F(EpochTest, SparseOddSizedImageFirstEpoch) {
  const uint64_t size = 10 * kMiB + 12345;  // not a multiple of any block
  ASSERT_TRUE(pool_.Create("src", size).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(1);
  Write(*src, 0, testing::RandomBytes(rng, 5000));
  Write(*src, 3 * kMiB + 17, testing::RandomBytes(rng, 2 * kMiB));
  Write(*src, size - 100, testing::RandomBytes(rng, 100));  // the odd tail
  Write(*src, 8 * kMiB, std::string(kMiB, '\0'));           // written zeros
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  auto sum = Ship(*src, *dst, 0, 1, TargetState::kFreshImage);
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(ImageHash(*dst, "", size), ImageHash(*src, "cairn.1", size));
  // Only allocated data travels (rounded to the memory volume's 64 KiB
  // chunks); the MiB of written zeros travels as zero records.
  EXPECT_LE(sum->data_bytes, 2 * kMiB + 5000 + 100 + 3 * 64 * 1024);
  EXPECT_GE(sum->data_bytes, 2 * kMiB + 5000 + 100);
}

TEST_F(EpochTest, TenGiBSparseSendsOnlyWhatIsWritten) {
  const uint64_t size = 10ull << 30;
  ASSERT_TRUE(pool_.Create("src", size).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(2);
  for (int i = 0; i < 4; ++i)
    Write(*src, (rng() % (size / kMiB - 1)) * kMiB, testing::RandomBytes(rng, kMiB));
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  auto sum = Ship(*src, *dst, 0, 1, TargetState::kFreshImage);
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->data_bytes, 4 * kMiB);
  EXPECT_EQ(*dst->Size(), size);
  EXPECT_EQ(*pool_.AllocatedBytes("dst"), 4 * kMiB);  // still sparse
}

TEST_F(EpochTest, IncrementalEpochsWithDiscardsZerosResizes) {
  uint64_t size = 6 * kMiB + 511;
  ASSERT_TRUE(pool_.Create("src", size).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(3);
  testing::RandomChanges(*src, rng, size, 20);
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  ASSERT_TRUE(Ship(*src, *dst, 0, 1, TargetState::kFreshImage).ok());
  for (uint64_t seq = 2; seq <= 6; ++seq) {
    if (seq == 3) {
      size += 3 * kMiB + 7;  // grow
      ASSERT_TRUE(src->Resize(size).ok());
    }
    if (seq == 5) {
      size -= 4 * kMiB;  // shrink
      ASSERT_TRUE(src->Resize(size).ok());
    }
    testing::RandomChanges(*src, rng, size, 15);
    Zero(*src, 0, 64 * 1024);  // a discard at the start, every time
    ASSERT_TRUE(src->CreateSnap(SnapName(seq)).ok());
    auto sum = Ship(*src, *dst, seq - 1, seq, TargetState::kHasData);
    ASSERT_TRUE(sum.ok()) << "epoch " << seq << ": " << sum.status().ToString();
    ASSERT_EQ(ImageHash(*dst, "", size), ImageHash(*src, SnapName(seq), size)) << "epoch " << seq;
  }
}

TEST_F(EpochTest, ZeroRunsInsideABlockTravelAsZeroRecords) {
  // The memory volume allocates 64 KiB chunks, so the written zeros between
  // the two data runs are allocated: the builder must find them itself.
  ASSERT_TRUE(pool_.Create("src", 2 * kMiB).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(6);
  std::string block = testing::RandomBytes(rng, kMiB);
  std::fill(block.begin() + 64 * 1024, block.begin() + 512 * 1024, '\0');
  std::fill(block.begin() + 576 * 1024, block.end(), '\0');
  Write(*src, 0, block);
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  auto sum = Ship(*src, *dst, 0, 1, TargetState::kFreshImage);
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->data_bytes, 2 * 64 * 1024u);
  EXPECT_EQ(sum->records, 4u);  // data, zero, data, zero
  EXPECT_EQ(ImageHash(*dst, "", 2 * kMiB), ImageHash(*src, "cairn.1", 2 * kMiB));
  EXPECT_EQ(*pool_.AllocatedBytes("dst"), 2 * 64 * 1024u);  // the standby stays sparse
}

TEST_F(EpochTest, SmallBlocksAndWindowOfOne) {
  const uint64_t size = 3 * kMiB + 1;
  ASSERT_TRUE(pool_.Create("src", size).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(4);
  testing::RandomChanges(*src, rng, size, 30);
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  SendOptions send;
  send.block_size = 4096;
  send.window = 1;
  ApplyOptions apply;
  apply.window = 1;
  ASSERT_TRUE(Ship(*src, *dst, 0, 1, TargetState::kFreshImage, send, apply).ok());
  EXPECT_EQ(ImageHash(*dst, "", size), ImageHash(*src, "cairn.1", size));
}

// Records of many sizes through a read arena of a few blocks: pieces wrap
// around its end and wait for older ones, and every epoch still verifies
// and applies to an equal image.
TEST_F(EpochTest, OddBlockSizeThroughASmallReadArena) {
  const uint64_t size = 2 * kMiB + 777;
  ASSERT_TRUE(pool_.Create("src", size).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(7);
  SendOptions opt;
  opt.block_size = 12800;  // 25 sectors: pieces of 16 KiB in the arena
  opt.window = 3;          // 37.5 KiB of reads: two pieces at a time
  for (uint64_t seq = 1; seq <= 4; ++seq) {
    testing::RandomChanges(*src, rng, size, 40);
    ASSERT_TRUE(src->CreateSnap(SnapName(seq)).ok());
    auto sum = Ship(*src, *dst, seq - 1, seq,
                    seq == 1 ? TargetState::kFreshImage : TargetState::kHasData, opt);
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    EXPECT_GT(sum->records, 10u);
    EXPECT_EQ(ImageHash(*dst, "", size), ImageHash(*src, SnapName(seq), size)) << "epoch " << seq;
  }
}

// The sink's window counts the bytes of the records in flight, not a
// block size: small records of an incremental keep many writes going, large
// ones of a full sync a few.
TEST_F(EpochTest, ApplyWindowIsBoundInBytes) {
  ASSERT_TRUE(pool_.Create("dst", 64 * kMiB).ok());
  auto dst = testing::MustOpen(pool_, "dst");
  // Most writes and bytes in flight while `n` records of `len` bytes are
  // added with a window of 32 writes and 8 MiB.
  const auto most = [&](uint64_t len, int n) -> std::pair<size_t, uint64_t> {
    ApplyOptions opt;
    opt.window = 32;
    opt.window_bytes = 8 * kMiB;
    ApplyStream apply(*dst, opt, TargetState::kHasData);
    EXPECT_TRUE(apply.Begin(64 * kMiB).ok());
    size_t writes = 0;
    uint64_t bytes = 0;
    for (int i = 0; i < n; ++i) {
      Frame f;
      f.type = FrameType::kRecord;
      f.payload = Payload(len, 'x');
      EXPECT_TRUE(
          apply.Add({static_cast<uint64_t>(i), i * len, len, RecordKind::kData}, std::move(f))
              .ok());
      writes = std::max(writes, apply.writes_in_flight());
      bytes = std::max(bytes, apply.bytes_in_flight());
    }
    EXPECT_TRUE(apply.Finish().ok());
    EXPECT_EQ(apply.writes_in_flight(), 0u);
    EXPECT_EQ(apply.bytes_in_flight(), 0u);
    return {writes, bytes};
  };
  EXPECT_EQ(most(64 * 1024, 100), std::make_pair(size_t{32}, uint64_t{2 * kMiB}));  // the count
  EXPECT_EQ(most(4 * kMiB, 10), std::make_pair(size_t{2}, uint64_t{8 * kMiB}));     // the bytes
  EXPECT_EQ(most(3 * kMiB, 10), std::make_pair(size_t{2}, uint64_t{6 * kMiB}));
  // A record larger than the byte window still goes, alone.
  EXPECT_EQ(most(12 * kMiB, 3), std::make_pair(size_t{1}, uint64_t{12 * kMiB}));
}

TEST_F(EpochTest, FourMiBRecordsThroughAOneWriteWindow) {
  const uint64_t size = 10 * kMiB + 4096;
  ASSERT_TRUE(pool_.Create("src", size).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  std::mt19937_64 rng(6);
  Write(*src, 0, testing::RandomBytes(rng, size));
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  SendOptions send;
  send.block_size = 4 * kMiB;
  send.window = 8;
  ApplyOptions apply;
  apply.window = 8;
  apply.window_bytes = 4 * kMiB;  // the sink: one 4 MiB write at a time
  auto sum = Ship(*src, *dst, 0, 1, TargetState::kFreshImage, send, apply);
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->records, 3u);  // 4 MiB, 4 MiB, 2 MiB + 4 KiB
  EXPECT_EQ(ImageHash(*dst, "", size), ImageHash(*src, "cairn.1", size));
}

// The base's digests as a sink answers them: from its point's snapshot.
class SnapDigests final : public BaseDigests {
 public:
  SnapDigests(Volume& vol, const std::string& snap) : io_(vol.OpenIo(snap).value()) {
    const std::vector<SnapInfo> snaps = vol.ListSnaps().value();
    for (const SnapInfo& s : snaps) {
      if (s.name == snap) size_ = s.size;
    }
  }
  StatusOr<std::string> Fetch(uint64_t offset, uint64_t length, uint32_t grain,
                              uint64_t image_size) override {
    ++fetches;
    return DigestRange(*io_, size_, offset, length, grain, image_size);
  }
  int fetches = 0;

 private:
  std::unique_ptr<AsyncIo> io_;
  uint64_t size_ = 0;
};

// The digests of a whole image, as DigestRange must give them.
std::string ExpectedDigests(const std::string& bytes, uint64_t image_size) {
  std::string padded = bytes;
  padded.resize(image_size, '\0');
  std::string out;
  for (uint64_t at = 0; at < image_size; at += kDigestGrain) {
    const uint64_t len = std::min<uint64_t>(kDigestGrain, image_size - at);
    const GrainDigest d = DigestOfGrain(std::span<const char>(padded.data() + at, len));
    out += std::string(reinterpret_cast<const char*>(d.bytes().data()), d.bytes().size());
  }
  return out;
}

TEST(BlockDigestsTest, DigestsOfASnapshotPastItsOwnSize) {
  MemoryPool pool;
  const uint64_t size = 5 * kMiB + 12345;  // not a multiple of a grain
  ASSERT_TRUE(pool.Create("img", size).ok());
  auto vol = testing::MustOpen(pool, "img");
  std::mt19937_64 rng(40);
  Write(*vol, 0, testing::RandomBytes(rng, size));
  Write(*vol, kMiB, std::string(2 * kDigestGrain, '\0'));  // written zeros: the zero digest
  ASSERT_TRUE(vol->CreateSnap("s").ok());
  std::string bytes(size, '\0');
  auto io = vol->OpenIo("s").value();
  ASSERT_TRUE(io->StartRead(0, 0, std::span<char>(bytes.data(), size)).ok());
  ASSERT_TRUE(io->WaitOne().status.ok());
  // The image grew to `bigger` since: its new bytes read as zeros.
  const uint64_t bigger = size + 3 * kDigestGrain + 99;
  const std::string want = ExpectedDigests(bytes, bigger);
  std::string got;
  for (uint64_t at = 0; at < bigger; at += kMiB) {
    auto part = DigestRange(*io, size, at, std::min(kMiB, bigger - at), kDigestGrain, bigger);
    ASSERT_TRUE(part.ok()) << part.status().ToString();
    got += *part;
  }
  EXPECT_EQ(got, want);
  EXPECT_TRUE(std::string_view(got).substr(kMiB / kDigestGrain * GrainDigest::kSize, 32) ==
              std::string(32, '\0'));
  // Requests no epoch makes.
  for (auto [off, len, grain] : std::vector<std::tuple<uint64_t, uint64_t, uint32_t>>{
           {4096, kMiB, kDigestGrain},                // not on a grain
           {0, bigger + kDigestGrain, kDigestGrain},  // past the image
           {0, 100, kDigestGrain},                    // a piece of a grain, not the image's end
           {0, kMiB, 3 * 4096},                       // not a power of two
           {0, 0, kDigestGrain},
       }) {
    EXPECT_EQ(DigestRange(*io, size, off, len, grain, bigger).status().code(),
              Code::kInvalidArgument)
        << off << " +" << len << " grain " << grain;
  }
  EXPECT_EQ(DigestRange(*io, size, 0, 2ull << 30, 4096, 4ull << 30).status().code(),
            Code::kInvalidArgument);  // too many digests for one reply
  EXPECT_EQ(DigestRange(*io, size, 0, UINT64_MAX, kDigestGrain, UINT64_MAX).status().code(),
            Code::kInvalidArgument);  // ... however the count is reckoned
}

// A resync whose base (the receiver's point) holds most of the image
// already: only the grains that differ travel, as data or as zeros, in
// records no longer than block_size, and the receiver ends equal.
TEST_F(EpochTest, AResyncByDigestsSendsOnlyTheGrainsThatDiffer) {
  for (const uint32_t block : {4096u, kDefaultBlockSize}) {
    SCOPED_TRACE(block);
    const uint64_t size = 6 * kMiB + 511;
    MemoryPool pool;
    ASSERT_TRUE(pool.Create("src", size).ok());
    ASSERT_TRUE(pool.Create("dst", 0).ok());
    auto src = testing::MustOpen(pool, "src");
    auto dst = testing::MustOpen(pool, "dst");
    std::mt19937_64 rng(41);
    Write(*src, 0, testing::RandomBytes(rng, 4 * kMiB));
    ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
    chain_ = {};
    ASSERT_TRUE(Ship(*src, *dst, 0, 1, TargetState::kFreshImage).ok());
    ASSERT_TRUE(dst->CreateSnap("cairn.1").ok());  // the receiver's point
    // The source loses its snapshot, then: two small writes, a discarded
    // grain, data past the old end of the data, and it grows.
    ASSERT_TRUE(src->RemoveSnap("cairn.1").ok());
    Write(*src, 100, "changed");
    Write(*src, 3 * kMiB + 5, testing::RandomBytes(rng, 4096));
    Zero(*src, kMiB, kDigestGrain);
    Write(*src, 5 * kMiB, testing::RandomBytes(rng, 10));
    const uint64_t grown = size + kMiB;
    ASSERT_TRUE(src->Resize(grown).ok());
    Write(*src, grown - 7, "tail");
    ASSERT_TRUE(src->CreateSnap("cairn.2").ok());
    SnapDigests base(*dst, "cairn.1");
    SendOptions send;
    send.block_size = block;
    send.base = &base;
    auto sum = Ship(*src, *dst, 1, 2, TargetState::kHasData, send);
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    EXPECT_EQ(ImageHash(*dst, "", grown), ImageHash(*src, "cairn.2", grown));
    EXPECT_EQ(sum->data_bytes, 3 * kDigestGrain + (grown - grown / kDigestGrain * kDigestGrain));
    EXPECT_EQ(sum->zero_bytes, kDigestGrain);
    EXPECT_EQ(base.fetches, 1);  // one window of digests covers 7 MiB
  }
}

TEST_F(EpochTest, EmptyEpochIsValid) {
  ASSERT_TRUE(pool_.Create("src", kMiB).ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto src = testing::MustOpen(pool_, "src");
  auto dst = testing::MustOpen(pool_, "dst");
  ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
  auto sum = Ship(*src, *dst, 0, 1, TargetState::kFreshImage);
  ASSERT_TRUE(sum.ok());
  EXPECT_EQ(sum->records, 0u);
  EXPECT_EQ(*dst->Size(), kMiB);
}

// Frames of an epoch, collected in memory.
struct Collect final : FrameWriter {
  Status Write(FrameType type, std::string_view body, std::span<const char> payload) override {
    frames.push_back(Frame{type, std::string(body), Payload(payload.begin(), payload.end())});
    return OkStatus();
  }
  std::vector<Frame> frames;
};

class VerifierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(pool_.Create("src", 4 * kMiB).ok());
    auto src = testing::MustOpen(pool_, "src");
    std::mt19937_64 rng(5);
    Write(*src, 0, testing::RandomBytes(rng, 3 * kMiB));
    ASSERT_TRUE(src->CreateSnap("cairn.1").ok());
    EpochPlan plan;
    plan.id.volume = "vol";
    plan.id.seq = 1;
    plan.to_snap = "cairn.1";
    plan.to_snap_id = testing::MustSnapId(*src, "cairn.1");
    plan.id.image_size = 4 * kMiB;
    SendOptions opt;
    opt.block_size = 1 * kMiB;
    ASSERT_TRUE(SendEpoch(*src, plan, opt, out_).ok());
    ASSERT_EQ(out_.frames.size(), 5u);  // begin, 3 records of 1 MiB, end
  }
  Status Run(const std::vector<Frame>& frames) {
    EpochVerifier v("vol", 0, ChainDigest());
    for (const Frame& f : frames) {
      auto s = v.Check(f);
      if (!s.ok()) return s.status();
    }
    return v.done() ? OkStatus() : Aborted("incomplete");
  }
  MemoryPool pool_;
  Collect out_;
};

TEST_F(VerifierTest, AcceptsTheEpochAsSent) { EXPECT_TRUE(Run(out_.frames).ok()); }

TEST_F(VerifierTest, LostDuplicatedReorderedFrames) {
  auto f = out_.frames;
  f.erase(f.begin() + 2);
  EXPECT_EQ(Run(f).message(),
            "record index 2 where 1 was expected (lost, duplicated or reordered frame)");
  f = out_.frames;
  f.insert(f.begin() + 2, f[1]);
  EXPECT_EQ(Run(f).message(),
            "record index 0 where 1 was expected (lost, duplicated or reordered frame)");
  f = out_.frames;
  std::swap(f[1], f[2]);
  EXPECT_EQ(Run(f).code(), Code::kDataLoss);
}

TEST_F(VerifierTest, FlippedPayloadByte) {
  auto f = out_.frames;
  f[2].payload[12345] ^= 1;
  EXPECT_EQ(Run(f).message(), "block checksum mismatch at offset 1048576 (record 1)");
}

TEST_F(VerifierTest, WrongVolumeOrBase) {
  EpochVerifier other("other", 0, ChainDigest());
  EXPECT_EQ(other.Check(out_.frames[0]).status().message(),
            "epoch of volume 'vol' on the stream of volume 'other'");
  EpochVerifier ahead("vol", 3, ChainDigest());
  auto st = ahead.Check(out_.frames[0]).status();
  EXPECT_EQ(st.code(), Code::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("newest restore point here is 3"));
}

TEST_F(VerifierTest, MissingEndOrRecordsAfterEnd) {
  auto f = out_.frames;
  f.pop_back();
  EXPECT_EQ(Run(f).code(), Code::kAborted);  // not done: never applied
  f = out_.frames;
  f.push_back(out_.frames[1]);
  EXPECT_EQ(Run(f).message(), "Record frame after EpochEnd");
}

TEST_F(VerifierTest, ApplyRefusesAnIncompleteSpool) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("cairn-vt-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  auto w = SpoolWriter::Create(dir / "1.spool", {"vol", 1});
  ASSERT_TRUE(w.ok());
  for (size_t i = 0; i + 1 < out_.frames.size(); ++i) {  // no EpochEnd
    const Frame& f = out_.frames[i];
    ASSERT_TRUE(
        (*w)->Append(EncodeHeader(f.type, f.body, f.payload.size()), f.body, f.payload).ok());
  }
  ASSERT_TRUE((*w)->Sync().ok());
  ASSERT_TRUE(pool_.Create("dst", 0).ok());
  auto dst = testing::MustOpen(pool_, "dst");
  auto r = SpoolReader::Open(dir / "1.spool", {"vol", 1});
  ASSERT_TRUE(r.ok());
  EpochVerifier v("vol", 0, ChainDigest());
  auto st = ApplyEpoch(**r, v, *dst, {}, TargetState::kFreshImage);
  EXPECT_EQ(st.status().message(), "spool ends before the end of epoch 1 (incomplete epoch)");
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace cairn
