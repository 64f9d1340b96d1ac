// The SpoolStore conformance suite over FileSpoolStore, MemorySpoolStore
// and a FaultSpoolStore (no fault) over each; then what only the twin
// offers (DropUnsynced), what only the files have (names that are not
// spools), and injected faults: a full disk mid-epoch, a torn sync, a
// failed Open. Errors are checked by exact text.
#include <fmt/format.h>
#include <unistd.h>

#include <fstream>

#include "engine/spool/fault_spool_store.h"
#include "engine/spool/file_spool_store.h"
#include "engine/spool/memory_spool_store.h"
#include "tests/unit/spool/spool_store_conformance.h"

namespace cairn {
namespace {

namespace fs = std::filesystem;
using namespace spool_store_test;

fs::path FreshDir() {
  static int n = 0;
  const char* tmp = std::getenv("TEST_TMPDIR");
  const fs::path dir = fs::path(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") /
                       fmt::format("cairn-spool-store-{}-{}", ::getpid(), ++n);
  fs::remove_all(dir);
  return dir;
}

// A FileSpoolStore over a fresh directory, removed with the store.
SpoolStoreTarget FileTarget() {
  const fs::path dir = FreshDir();
  std::shared_ptr<SpoolStore> store(new FileSpoolStore(dir), [dir](SpoolStore* s) {
    delete s;
    fs::remove_all(dir);
  });
  auto flip = [dir](const std::string& volume, uint64_t seq, uint64_t offset) {
    std::fstream f(dir / volume / fmt::format("{}.spool", seq),
                   std::ios::in | std::ios::out | std::ios::binary);
    char c = 0;
    f.seekg(static_cast<std::streamoff>(offset));
    f.read(&c, 1);
    c ^= 0x01;
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(&c, 1);
    ASSERT_TRUE(f) << "offset " << offset;
  };
  return {store, flip};
}

SpoolStoreTarget MemoryTarget() {
  auto mem = std::make_shared<MemorySpoolStore>("/memory/spool");
  auto flip = [mem](const std::string& volume, uint64_t seq, uint64_t offset) {
    std::string bytes = mem->Contents(volume, seq);
    ASSERT_LT(offset, bytes.size());
    bytes[offset] ^= 0x01;
    mem->SetContents(volume, seq, std::move(bytes));
  };
  return {mem, flip};
}

// `inner` again, through a FaultSpoolStore with no fault.
SpoolStoreTarget ThroughFault(SpoolStoreTarget inner) {
  auto fault = std::make_shared<FaultSpoolStore>(*inner.store);
  // The wrapper keeps the wrapped store alive.
  std::shared_ptr<SpoolStore> store(fault.get(), [fault, keep = inner.store](SpoolStore*) {});
  return {store, inner.flip};
}

INSTANTIATE_TEST_SUITE_P(
    Stores, SpoolStoreConformanceTest,
    ::testing::Values(SpoolStoreParam{"File", FileTarget}, SpoolStoreParam{"Memory", MemoryTarget},
                      SpoolStoreParam{"FaultOverFile", [] { return ThroughFault(FileTarget()); }},
                      SpoolStoreParam{"FaultOverMemory",
                                      [] { return ThroughFault(MemoryTarget()); }}),
    SpoolStoreParamName);

// ---------------------------------------------------------------------------
// What only one store has.

TEST(MemorySpoolStoreTest, DropUnsyncedKeepsWhatWasSyncedOnly) {
  MemorySpoolStore mem;
  const auto frames = SomeFrames(6, 70);
  {
    auto w = mem.Create("vol1", 2, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
    for (int i = 3; i < 6; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    auto never = mem.Create("vol1", 3, SmallBuffers());  // never synced
    ASSERT_TRUE(never.ok());
    ExpectFrames(ReadAll(mem, "vol1", 2), frames, 6);  // before the crash: all written
    mem.DropUnsynced();
    ASSERT_TRUE(Append(**w, frames[0]).ok());  // the dead writer's: lands nowhere
    ASSERT_TRUE((*w)->Sync().ok());
  }
  EXPECT_EQ(*mem.List("vol1"), (std::vector<uint64_t>{2}));
  ReadBack r = ReadAll(mem, "vol1", 2);
  ExpectFrames(r, frames, 3);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST(MemorySpoolStoreTest, HoldsTheFileStoresBytes) {
  const fs::path dir = FreshDir();
  FileSpoolStore files(dir);
  MemorySpoolStore mem(dir);
  const auto frames = SomeFrames(5, 80);
  for (SpoolStore* s : {static_cast<SpoolStore*>(&files), static_cast<SpoolStore*>(&mem)}) {
    auto w = s->Create("vol1", 9, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
    for (int i = 3; i < 5; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
  }
  std::ifstream f(dir / "vol1" / "9.spool", std::ios::binary);
  const std::string on_disk((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(on_disk.size(), mem.Contents("vol1", 9).size());
  EXPECT_TRUE(on_disk == mem.Contents("vol1", 9));
  fs::remove_all(dir);
}

TEST(FileSpoolStoreTest, NamesThatAreNotSpoolsAreNotListed) {
  const fs::path dir = FreshDir();
  FileSpoolStore files(dir);
  fs::create_directories(dir / "vol1");
  fs::create_directories(dir / "empty");
  for (const char* name : {"0.spool", "x.spool", "7.spool.tmp", "12a.spool", ".cairn-check-1"}) {
    std::ofstream(dir / "vol1" / name) << "junk";
  }
  std::ofstream(dir / "vol1" / "4.spool") << "junk";
  EXPECT_EQ(*files.List("vol1"), (std::vector<uint64_t>{4}));
  EXPECT_EQ(*files.Volumes(), (std::vector<std::string>{"vol1"}));
  EXPECT_EQ(files.PathOf("vol1", 4), dir / "vol1" / "4.spool");
  fs::remove_all(dir);
}

TEST(FileSpoolStoreTest, AVolumeWhoseDirectoryCannotBeMadeIsRefused) {
  const fs::path dir = FreshDir();
  FileSpoolStore files(dir);
  fs::create_directories(dir);
  std::ofstream(dir / "vol1") << "in the way";
  const std::string want =
      fmt::format("cannot create spool directory {}: ", (dir / "vol1").string());
  const Status added = files.AddVolume("vol1");
  EXPECT_EQ(added.code(), Code::kFailedPrecondition);
  EXPECT_TRUE(added.message().starts_with(want)) << added.ToString();
  const Status created = files.Create("vol1", 1, SmallBuffers()).status();
  EXPECT_EQ(created.ToString(), added.ToString());
  EXPECT_TRUE(files.AddVolume("vol2").ok());
  EXPECT_TRUE(fs::is_directory(dir / "vol2"));
  EXPECT_TRUE(files.List("vol2")->empty());
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------
// Injected faults, over the twin (a crash is DropUnsynced) and the files
// (nothing of the epoch after the fault reaches them).

class SpoolFaultTest : public ::testing::TestWithParam<SpoolStoreParam> {
 protected:
  void SetUp() override {
    inner_ = GetParam().make();
    fault_ = std::make_unique<FaultSpoolStore>(*inner_.store);
  }
  // A crash: the twin drops what was not synced; the files keep what the
  // writer's file holds (nothing past its last sync in these tests).
  void Crash() {
    if (auto* mem = dynamic_cast<MemorySpoolStore*>(inner_.store.get())) mem->DropUnsynced();
  }
  std::string PathOf(uint64_t seq) {
    return (fs::path(fault_->where()) / "vol1" / fmt::format("{}.spool", seq)).string();
  }

  SpoolStoreTarget inner_;
  std::unique_ptr<FaultSpoolStore> fault_;
};

INSTANTIATE_TEST_SUITE_P(Stores, SpoolFaultTest,
                         ::testing::Values(SpoolStoreParam{"File", FileTarget},
                                           SpoolStoreParam{"Memory", MemoryTarget}),
                         SpoolStoreParamName);

TEST_P(SpoolFaultTest, DiskFullMidEpochKeepsTheSyncedPrefix) {
  // Small frames after the sync: they stay in the writer's staging buffer.
  std::vector<TestFrame> frames = SomeFrames(3, 90);
  for (int i = 3; i < 6; ++i) frames.push_back(MakeFrame(10, 100, 90 + i));
  const Status full =
      ResourceExhausted(
          fmt::format("spool disk full: writing spool {}: No space left on device", PathOf(5)))
          .WithReason(Reason::kSpoolDiskFull);
  std::vector<SpoolFaultPoint> asked;
  fault_->SetFault([&](const SpoolFaultPoint& p) -> SpoolFault {
    asked.push_back(p);
    if (p.op == SpoolOp::kAppend && p.offset == Total(frames, 5)) return full;
    return {};
  });
  {
    auto w = fault_->Create("vol1", 5, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
    for (int i = 3; i < 5; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    EXPECT_EQ(Append(**w, frames[5]).ToString(), full.ToString());
    EXPECT_EQ(Append(**w, frames[0]).ToString(), full.ToString());  // failed from now on
    EXPECT_EQ((*w)->Sync().status().ToString(), full.ToString());
    EXPECT_EQ((*w)->Sync().status().reason(), Reason::kSpoolDiskFull);
  }
  ASSERT_EQ(asked.size(), 8u);  // Create, 3 Appends, Sync, 3 Appends; then none
  EXPECT_EQ(asked[4].op, SpoolOp::kSync);
  EXPECT_EQ(asked[4].length, Total(frames, 3));
  Crash();
  ReadBack r = ReadAll(*fault_, "vol1", 5);
  ExpectFrames(r, frames, 3);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolFaultTest, ATornSyncKeepsAPrefixOfTheUnsyncedBytes) {
  std::vector<TestFrame> frames = SomeFrames(3, 100);
  frames.push_back(MakeFrame(20, 3000, 103));
  frames.push_back(MakeFrame(20, 30000, 104));
  const uint64_t synced = Total(frames, 3);
  const uint64_t keep = frames[3].size() + kFrameHeaderSize + 20 + 100;
  fault_->SetFault([&](const SpoolFaultPoint& p) -> SpoolFault {
    if (p.op != SpoolOp::kSync || p.offset == 0) return {};
    EXPECT_EQ(p.offset, synced);
    EXPECT_EQ(p.length, frames[3].size() + frames[4].size());
    return SpoolFault(Unavailable("the host lost power during the sync"), keep);
  });
  {
    auto w = fault_->Create("vol1", 6, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    ASSERT_TRUE((*w)->Sync().ok());
    for (int i = 3; i < 5; ++i) ASSERT_TRUE(Append(**w, frames[i]).ok());
    EXPECT_TRUE(
        StatusIs((*w)->Sync().status(), Code::kUnavailable, "the host lost power during the sync"));
    EXPECT_EQ((*w)->appended(), synced + keep);
  }
  Crash();
  ReadBack r = ReadAll(*fault_, "vol1", 6);
  ExpectFrames(r, frames, 4);
  const uint64_t at = Total(frames, 4);
  const uint64_t block_end = (kSpoolHeaderSize + synced + keep + 4095) / 4096 * 4096;
  EXPECT_TRUE(StatusIs(r.end, Code::kDataLoss,
                       fmt::format("torn or corrupt frame at spool offset {}: truncated frame: "
                                   "wanted 30000 bytes, {} left",
                                   at, block_end - kSpoolHeaderSize - at - kFrameHeaderSize - 20)));
}

TEST_P(SpoolFaultTest, AFailedOpenCreateResumeOrRemoveDoesNothing) {
  const auto frames = SomeFrames(2, 110);
  {
    auto w = fault_->Create("vol1", 8, SmallBuffers());
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    for (const auto& f : frames) ASSERT_TRUE(Append(**w, f).ok());
    ASSERT_TRUE((*w)->Sync().ok());
  }
  fault_->SetFault([](const SpoolFaultPoint& p) -> SpoolFault {
    switch (p.op) {
      case SpoolOp::kOpen:
        return Internal(fmt::format("injected: opening spool {}/{}.spool", p.volume, p.seq));
      case SpoolOp::kCreate:
      case SpoolOp::kResume:
        return FailedPrecondition("injected: spool directory not writable");
      case SpoolOp::kRemove:
        return Unavailable("injected: the disk does not answer");
      default:
        return {};
    }
  });
  EXPECT_TRUE(StatusIs(fault_->Open("vol1", 8).status(), Code::kInternal,
                       "injected: opening spool vol1/8.spool"));
  EXPECT_TRUE(StatusIs(fault_->Create("vol1", 8, SmallBuffers()).status(),
                       Code::kFailedPrecondition, "injected: spool directory not writable"));
  EXPECT_TRUE(StatusIs(fault_->Resume("vol1", 8, 0, SmallBuffers()).status(),
                       Code::kFailedPrecondition, "injected: spool directory not writable"));
  EXPECT_TRUE(StatusIs(fault_->Remove("vol1", 8), Code::kUnavailable,
                       "injected: the disk does not answer"));
  EXPECT_EQ(*fault_->List("vol1"), (std::vector<uint64_t>{8}));  // not a fault point
  fault_->SetFault(nullptr);
  ReadBack r = ReadAll(*fault_, "vol1", 8);
  ExpectFrames(r, frames, 2);
  EXPECT_TRUE(StatusIs(r.end, Code::kAborted, "end of spool"));
}

TEST_P(SpoolFaultTest, AQuotaFaultLeavesTheWriterUsable) {
  const auto frames = SomeFrames(3, 120);
  fault_->SetFault([&](const SpoolFaultPoint& p) -> SpoolFault {
    if (p.op == SpoolOp::kAppend && p.offset == Total(frames, 1)) {
      return ResourceExhausted("injected quota").WithReason(Reason::kSpoolQuota);
    }
    return {};
  });
  auto w = fault_->Create("vol1", 9, SmallBuffers());
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  ASSERT_TRUE(Append(**w, frames[0]).ok());
  EXPECT_TRUE(StatusIs(Append(**w, frames[1]), Code::kResourceExhausted, "injected quota"));
  StatusOr<uint64_t> len = (*w)->Sync();
  ASSERT_TRUE(len.ok()) << len.status().ToString();
  EXPECT_EQ(*len, frames[0].size());
}

}  // namespace
}  // namespace cairn
