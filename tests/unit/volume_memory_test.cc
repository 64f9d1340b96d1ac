// The Volume conformance suite over MemoryPool, plus what only the memory
// store offers: an injected clock and allocation accounting. And FaultPool
// (fault_pool.h) over it: the suite again through a FaultPool with no fault
// (it forwards everything), then injected faults.
#include <fmt/format.h>

#include <thread>

#include "engine/volume/fault_pool.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/test_util.h"
#include "tests/unit/volume_conformance.h"

namespace cairn {
namespace {

using volume_test::kGiB;
using volume_test::kKiB;
using volume_test::kMiB;
using volume_test::Pattern;
using volume_test::ReadAt;
using volume_test::WriteAt;
using volume_test::ZeroAt;

MemoryPoolOptions Chunked(uint64_t chunk_size) {
  MemoryPoolOptions o;
  o.chunk_size = chunk_size;
  return o;
}

VolumeConformanceParam MemoryParam(uint64_t chunk_size, std::string label) {
  return {std::move(label), [chunk_size]() -> StatusOr<VolumeTestTarget> {
            VolumeTestTarget t;
            t.pool = std::make_unique<MemoryPool>("mem", Chunked(chunk_size));
            t.diff_granularity = std::max<uint64_t>(chunk_size, 64 * kKiB);
            t.name_prefix = "img-";
            return t;
          }};
}

INSTANTIATE_TEST_SUITE_P(Memory, VolumeConformanceTest,
                         ::testing::Values(MemoryParam(64 * kKiB, "Chunk64K"),
                                           MemoryParam(4 * kKiB, "Chunk4K"),
                                           ThroughFaultPool(MemoryParam(64 * kKiB, "Chunk64K"))),
                         VolumeParamName);

TEST(MemoryVolumeTest, SnapshotTimesComeFromTheInjectedClock) {
  int64_t now = 1'700'000'000'000'000'000;
  MemoryPoolOptions options;
  options.now_ns = [&] { return now; };
  MemoryPool pool("mem", options);
  CAIRN_ASSERT_OK(pool.Create("a", kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  now += 5'000'000'000;
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 2u);
  EXPECT_EQ(snaps[0].time_ns, 1'700'000'000'000'000'000);
  EXPECT_EQ(snaps[1].time_ns, 1'700'000'005'000'000'000);
}

TEST(MemoryVolumeTest, OnlyWrittenChunksAreAllocatedAndZeroingFreesThem) {
  MemoryPool pool("mem", Chunked(64 * kKiB));
  CAIRN_ASSERT_OK(pool.Create("a", 10 * kGiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t bytes, pool.AllocatedBytes("a"));
  EXPECT_EQ(bytes, 0u);
  CAIRN_ASSERT_OK(WriteAt(*v, 64 * kKiB - 1, Pattern(1, 2)));  // touches two chunks
  CAIRN_ASSERT_OK_AND_ASSIGN(bytes, pool.AllocatedBytes("a"));
  EXPECT_EQ(bytes, 128 * kKiB);
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));

  // Zeroing part of a chunk keeps it; zeroing its last data drops it.
  CAIRN_ASSERT_OK(ZeroAt(*v, 0, 100));
  CAIRN_ASSERT_OK_AND_ASSIGN(bytes, pool.AllocatedBytes("a"));
  EXPECT_EQ(bytes, 128 * kKiB);
  CAIRN_ASSERT_OK(ZeroAt(*v, 64 * kKiB - 1, 1));
  CAIRN_ASSERT_OK_AND_ASSIGN(bytes, pool.AllocatedBytes("a"));
  EXPECT_EQ(bytes, 64 * kKiB);
  // A write of zeros allocates, as on RBD.
  CAIRN_ASSERT_OK(WriteAt(*v, kGiB, std::string(10, '\0')));
  CAIRN_ASSERT_OK_AND_ASSIGN(bytes, pool.AllocatedBytes("a"));
  EXPECT_EQ(bytes, 128 * kKiB);
  // The snapshot kept its chunks.
  CAIRN_ASSERT_OK_AND_ASSIGN(bytes, pool.AllocatedBytes("a", "s1"));
  EXPECT_EQ(bytes, 128 * kKiB);
  CAIRN_EXPECT_CODE(pool.AllocatedBytes("a", "nope").status(), Code::kNotFound);

  // Exact expectations at chunk granularity.
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, volume_test::CollectDiff(*v, "s1", "s2"));
  EXPECT_EQ(d, (std::vector<Extent>{{0, 64 * kKiB, RecordKind::kZero},
                                    {kGiB, 64 * kKiB, RecordKind::kData}}));
  CAIRN_ASSERT_OK_AND_ASSIGN(d, volume_test::CollectDiff(*v, "", "s1"));
  EXPECT_EQ(d, (std::vector<Extent>{{0, 128 * kKiB, RecordKind::kData}}));
}

TEST(MemoryVolumeTest, DiffClipsTheLastChunkToTheSize) {
  MemoryPool pool("mem", Chunked(64 * kKiB));
  CAIRN_ASSERT_OK(pool.Create("a", 100 * kKiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  CAIRN_ASSERT_OK(WriteAt(*v, 90 * kKiB, Pattern(2, 10 * kKiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, volume_test::CollectDiff(*v, "", "s1"));
  EXPECT_EQ(d, (std::vector<Extent>{{64 * kKiB, 36 * kKiB, RecordKind::kData}}));
}

// The volume is opened before the fault is installed: it sees it all the same.
TEST(FaultPoolTest, AnInjectedIoFaultArrivesWithItsCompletionAndIsNotApplied) {
  MemoryPool memory;
  FaultPool pool(memory);
  CAIRN_ASSERT_OK(pool.Create("a", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  pool.SetFault([](const VolumeFaultPoint& p) {
    if (p.op == VolumeOp::kWrite && p.offset == 8192) return Unavailable("injected");
    return OkStatus();
  });
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo(""));
  const std::string data = Pattern(3, 4096);
  CAIRN_ASSERT_OK(io->StartWrite(1, 0, data));
  CAIRN_ASSERT_OK(io->StartWrite(2, 8192, data));
  CAIRN_ASSERT_OK(io->StartWrite(3, 16384, data));
  EXPECT_EQ(io->InFlight(), 3u);
  EXPECT_EQ(io->WaitOne().tag, 1u);
  AsyncIo::Completion c = io->WaitOne();
  EXPECT_EQ(c.tag, 2u);
  EXPECT_EQ(c.status.code(), Code::kUnavailable);
  EXPECT_NE(c.status.message().find("injected"), std::string::npos);
  EXPECT_NE(c.status.message().find("writing memory/a at 8192~4096"), std::string::npos)
      << c.status.ToString();
  EXPECT_EQ(io->InFlight(), 1u);
  CAIRN_ASSERT_OK(io->Drain());
  EXPECT_EQ(io->write_stats().writes, 3u);  // started by the caller
  EXPECT_EQ(io->write_stats().ops, 2u);     // reached the store

  pool.SetFault(nullptr);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "", 8192, 4096));
  EXPECT_EQ(got, std::string(4096, '\0'));
  CAIRN_ASSERT_OK_AND_ASSIGN(got, ReadAt(*v, "", 16384, 4096));
  EXPECT_EQ(got, data);
}

TEST(FaultPoolTest, DrainReturnsTheFirstErrorAndEmptiesTheWindow) {
  MemoryPool memory;
  FaultPool pool(memory);
  CAIRN_ASSERT_OK(pool.Create("a", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  pool.SetFault([](const VolumeFaultPoint& p) {
    if (p.op == VolumeOp::kRead) return DataLoss("bad sector " + std::to_string(p.offset));
    return OkStatus();
  });
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo(""));
  std::string buf(4096, '\0');
  CAIRN_ASSERT_OK(io->StartRead(1, 4096, std::span<char>(buf)));
  CAIRN_ASSERT_OK(io->StartRead(2, 8192, std::span<char>(buf)));
  const Status s = io->Drain();
  EXPECT_EQ(s.code(), Code::kDataLoss);
  EXPECT_NE(s.message().find("bad sector 4096"), std::string::npos) << s.ToString();
  EXPECT_EQ(io->InFlight(), 0u);
}

TEST(FaultPoolTest, InjectedFaultsOnMetadataOperations) {
  MemoryPool memory;
  FaultPool pool(memory);
  CAIRN_ASSERT_OK(pool.Create("a", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  pool.SetFault([](const VolumeFaultPoint& p) {
    if (p.op == VolumeOp::kCreateSnap && p.snap == "doomed") return ResourceExhausted("full");
    if (p.op == VolumeOp::kDiff) return Unavailable("cluster away");
    return OkStatus();
  });
  CAIRN_EXPECT_CODE(v->CreateSnap("doomed"), Code::kResourceExhausted);
  CAIRN_ASSERT_OK(v->CreateSnap("fine"));
  CAIRN_EXPECT_CODE(v->DiffExtents("", "fine", [](const Extent&) { return OkStatus(); }),
                    Code::kUnavailable);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  EXPECT_EQ(snaps[0].name, "fine");
}

// Each operation asks the fault once, naming what it concerns; a faulted
// one leaves the wrapped pool as it was.
TEST(FaultPoolTest, EveryOperationAsksTheFaultAndAFaultedOneDoesNothing) {
  MemoryPool memory;
  FaultPool pool(memory);
  CAIRN_ASSERT_OK(memory.Create("a", kMiB));
  std::vector<std::string> asked;
  pool.SetFault([&](const VolumeFaultPoint& p) {
    asked.push_back(
        fmt::format("{} {}@{} {}~{}", static_cast<int>(p.op), p.image, p.snap, p.offset, p.length));
    return Unavailable("injected");
  });
  CAIRN_EXPECT_CODE(pool.Open("a").status(), Code::kUnavailable);
  CAIRN_EXPECT_CODE(pool.Create("b", kMiB), Code::kUnavailable);
  CAIRN_EXPECT_CODE(pool.Remove("a"), Code::kUnavailable);
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> direct, memory.Open("a"));
    CAIRN_ASSERT_OK(direct->CreateSnap("s"));
  }
  CAIRN_EXPECT_CODE(pool.Clone("a", "s", "c"), Code::kUnavailable);
  CAIRN_EXPECT_CODE(pool.Copy("a", "s", "d", nullptr), Code::kUnavailable);
  EXPECT_FALSE(*memory.Exists("b"));
  EXPECT_TRUE(*memory.Exists("a"));
  EXPECT_FALSE(*memory.Exists("c"));
  EXPECT_FALSE(*memory.Exists("d"));
  CAIRN_ASSERT_OK_AND_ASSIGN(bool exists, pool.Exists("a"));  // not a fault point
  EXPECT_TRUE(exists);

  pool.SetFault(nullptr);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  pool.SetFault([&](const VolumeFaultPoint& p) {
    asked.push_back(
        fmt::format("{} {}@{} {}~{}", static_cast<int>(p.op), p.image, p.snap, p.offset, p.length));
    return p.op == VolumeOp::kOpenIo || p.op == VolumeOp::kDrain ? OkStatus()
                                                                 : Unavailable("injected");
  });
  CAIRN_EXPECT_CODE(v->Resize(2 * kMiB), Code::kUnavailable);
  CAIRN_EXPECT_CODE(v->CreateSnap("t"), Code::kUnavailable);
  CAIRN_EXPECT_CODE(v->RemoveSnap("s"), Code::kUnavailable);
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t size, v->Size());  // not a fault point
  EXPECT_EQ(size, kMiB);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  CAIRN_ASSERT_OK(v->ConfirmSnap("s", snaps[0].id));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo("s"));
  std::string buf(512, '\0');
  CAIRN_ASSERT_OK(io->StartRead(7, 1024, std::span<char>(buf)));
  CAIRN_ASSERT_OK(io->StartZero(8, 0, 512));  // faulted before the store refuses it
  AsyncIo::Completion c = io->WaitOne();
  EXPECT_EQ(c.tag, 7u);
  EXPECT_EQ(c.status.ToString(), "Unavailable: reading memory/a@s at 1024~512: injected");
  c = io->WaitOne();
  EXPECT_EQ(c.tag, 8u);
  EXPECT_EQ(c.status.ToString(), "Unavailable: zeroing memory/a@s at 0~512: injected");
  CAIRN_ASSERT_OK(io->Drain());
  EXPECT_EQ(asked, (std::vector<std::string>{
                       "0 a@ 0~0",         // kOpen
                       "1 b@ 0~0",         // kCreate
                       "2 a@ 0~0",         // kRemove
                       "3 a@s 0~0",        // kClone
                       "4 a@s 0~0",        // kCopy
                       "5 a@ 0~0",         // kResize
                       "6 a@t 0~0",        // kCreateSnap
                       "7 a@s 0~0",        // kRemoveSnap
                       "9 a@s 0~0",        // kOpenIo
                       "10 a@s 1024~512",  // kRead
                       "12 a@s 0~512",     // kZero
                       "13 a@s 0~0",       // kDrain
                   }));
}

TEST(MemoryVolumeTest, ARemovedImageReadsAsZerosThroughItsRemainingHandles) {
  MemoryPool pool;
  CAIRN_ASSERT_OK(pool.Create("a", 4 * kMiB));
  std::unique_ptr<AsyncIo> io;
  uint64_t snap_id = 0;
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
    CAIRN_ASSERT_OK(volume_test::WriteAt(*v, 0, std::string(4096, 'x')));
    CAIRN_ASSERT_OK(v->CreateSnap("s1"));
    snap_id = testing::MustSnapId(*v, "s1");
    CAIRN_ASSERT_OK_AND_ASSIGN(io, v->OpenIo("s1"));
  }
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> old, pool.Open("a"));
  // A read-only handle does not keep the image, as on RBD; its reads then
  // find nothing, and RADOS answers those with zeros, not an error.
  CAIRN_ASSERT_OK(pool.Remove("a"));
  std::string buf(10, 'y');
  CAIRN_ASSERT_OK(io->StartRead(1, 0, std::span<char>(buf)));
  CAIRN_EXPECT_OK(io->WaitOne().status);
  EXPECT_EQ(buf, std::string(10, '\0'));
  CAIRN_EXPECT_CODE(old->ConfirmSnap("s1", snap_id), Code::kNotFound);
  // A new image of the same name is a new image.
  CAIRN_ASSERT_OK(pool.Create("a", kMiB));
  CAIRN_EXPECT_CODE(old->ConfirmSnap("s1", snap_id), Code::kNotFound);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  EXPECT_TRUE(snaps.empty());
}

TEST(MemoryVolumeTest, ThePoolIsSafeToUseFromManyThreads) {
  MemoryPool pool;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      const std::string name = "t" + std::to_string(t);
      if (!pool.Create(name, 8 * kMiB).ok()) ++failures;
      StatusOr<std::unique_ptr<Volume>> v = pool.Open(name);
      if (!v.ok()) {
        ++failures;
        return;
      }
      for (int i = 0; i < 50; ++i) {
        if (!WriteAt(**v, (i * 65537) % (7 * kMiB), Pattern(t * 100 + i, 4096)).ok()) ++failures;
        if (i % 10 == 0 && !(*v)->CreateSnap("s" + std::to_string(i)).ok()) ++failures;
      }
      StatusOr<bool> exists = pool.Exists("t" + std::to_string((t + 1) % 8));
      if (!exists.ok()) ++failures;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  for (int t = 0; t < 8; ++t) CAIRN_EXPECT_CODE(pool.Remove("t" + std::to_string(t)), Code::kOk);
}

}  // namespace
}  // namespace cairn
