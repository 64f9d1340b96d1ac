// The Volume conformance suite over MemoryPool, and again through a
// FaultPool with no fault (it forwards everything), plus what only the
// memory store offers: an injected clock and allocation accounting.
#include "engine/volume/memory_volume.h"

#include <fmt/format.h>

#include <thread>

#include "engine/volume/fault_pool.h"
#include "tests/unit/test_util.h"
#include "tests/unit/volume/volume_conformance.h"

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
