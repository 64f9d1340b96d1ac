// The Volume conformance suite over MemoryPool, and again through a
// FaultPool with no fault (it forwards everything), plus what only the
// memory store offers: an injected clock, allocation accounting, and its
// own groups (membership and the atomicity of a group snapshot).
#include "engine/volume/memory_volume.h"

#include <fmt/format.h>

#include <atomic>
#include <thread>

#include "engine/volume/fault_pool.h"
#include "tests/unit/test_util.h"
#include "tests/unit/volume/volume_conformance.h"
#include "tests/unit/volume/volume_group_conformance.h"

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
            auto pool = std::make_unique<MemoryPool>("mem", Chunked(chunk_size));
            MemoryPool* memory = pool.get();  // lives as long as t.pool, wrapped or not
            t.pool = std::move(pool);
            t.make_group = [memory](const std::string& group,
                                    const std::vector<std::string>& images) -> Status {
              RETURN_IF_ERROR(memory->CreateGroup(group));
              for (const auto& image : images) RETURN_IF_ERROR(memory->AddToGroup(group, image));
              return OkStatus();
            };
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

// --- groups --------------------------------------------------------------------

// A writer bumps a counter in image a, then in image b, over and over: at
// every instant a holds b's value or one more. A group snapshot, taken under
// the pool's lock, must catch such an instant; one member after the other
// would let b run ahead of a.
TEST(MemoryVolumeTest, AGroupSnapshotIsOneInstantUnderAConcurrentWriter) {
  MemoryPool pool("mem", Chunked(4 * kKiB));
  CAIRN_ASSERT_OK(pool.Create("a", kMiB));
  CAIRN_ASSERT_OK(pool.Create("b", kMiB));
  CAIRN_ASSERT_OK(pool.CreateGroup("g"));
  CAIRN_ASSERT_OK(pool.AddToGroup("g", "a"));
  CAIRN_ASSERT_OK(pool.AddToGroup("g", "b"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> a, pool.Open("a"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> b, pool.Open("b"));
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::atomic<uint64_t> written{0};
  std::thread writer([&] {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io_a, a->OpenIo(""));
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io_b, b->OpenIo(""));
    for (uint64_t n = 1; !stop; ++n) {
      const std::string value = fmt::format("{:016}", n);
      for (AsyncIo* io : {io_a.get(), io_b.get()}) {
        if (!io->StartWrite(n, 0, value).ok() || !io->WaitOne().status.ok()) ++failures;
      }
      written = n;
    }
  });
  while (written < 10) std::this_thread::yield();
  constexpr int kSnaps = 200;
  for (int i = 0; i < kSnaps; ++i) {
    CAIRN_ASSERT_OK(pool.CreateGroupSnap("g", fmt::format("{}", i)));
    // The writer moves on before the next one, wherever it stood.
    for (const uint64_t at = written; written == at;) std::this_thread::yield();
  }
  stop = true;
  writer.join();
  EXPECT_EQ(failures.load(), 0);
  for (int i = 0; i < kSnaps; ++i) {
    const std::string share = GroupSnapName(fmt::format("{}", i));
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string at_a, ReadAt(*a, share, 0, 16));
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string at_b, ReadAt(*b, share, 0, 16));
    const uint64_t va = at_a[0] == '\0' ? 0 : std::stoull(at_a);
    const uint64_t vb = at_b[0] == '\0' ? 0 : std::stoull(at_b);
    ASSERT_TRUE(va == vb || va == vb + 1) << share << ": a holds " << va << ", b " << vb;
  }
}

TEST(MemoryVolumeTest, AnImageIsInOneGroupAtMost) {
  MemoryPool pool;
  CAIRN_ASSERT_OK(pool.Create("a", kMiB));
  CAIRN_EXPECT_CODE(pool.CreateGroup(""), Code::kInvalidArgument);
  CAIRN_ASSERT_OK(pool.CreateGroup("g"));
  CAIRN_ASSERT_OK(pool.CreateGroup("h"));
  CAIRN_EXPECT_CODE(pool.CreateGroup("g"), Code::kAlreadyExists);
  CAIRN_EXPECT_CODE(pool.AddToGroup("nope", "a"), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool.AddToGroup("g", "nope"), Code::kNotFound);
  CAIRN_ASSERT_OK(pool.AddToGroup("g", "a"));
  CAIRN_EXPECT_CODE(pool.AddToGroup("g", "a"), Code::kAlreadyExists);
  CAIRN_EXPECT_CODE(pool.AddToGroup("h", "a"), Code::kFailedPrecondition);
  CAIRN_EXPECT_CODE(pool.RemoveFromGroup("h", "a"), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool.RemoveFromGroup("nope", "a"), Code::kNotFound);
  // Membership follows the image through a rename, and goes with it.
  CAIRN_ASSERT_OK(pool.Rename("a", "a2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> images, pool.GroupImages("g"));
  EXPECT_EQ(images, std::vector<std::string>{"a2"});
  CAIRN_ASSERT_OK(pool.Remove("a2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(images, pool.GroupImages("g"));
  EXPECT_TRUE(images.empty());
  CAIRN_ASSERT_OK(pool.Create("a2", kMiB));  // a new image of the old name: in no group
  CAIRN_ASSERT_OK_AND_ASSIGN(images, pool.GroupImages("g"));
  EXPECT_TRUE(images.empty());
  CAIRN_ASSERT_OK(pool.AddToGroup("h", "a2"));
}

// As in RBD: a group snapshot is of the images it was taken of. One that
// left the group keeps its share until the group snapshot is removed, and
// cannot join a group that would give it a second share of that name.
TEST(MemoryVolumeTest, AnImageThatLeftItsGroupKeepsItsShareUntilTheGroupSnapshotGoes) {
  MemoryPool pool;
  CAIRN_ASSERT_OK(pool.Create("a", kMiB));
  CAIRN_ASSERT_OK(pool.Create("b", kMiB));
  CAIRN_ASSERT_OK(pool.CreateGroup("g"));
  CAIRN_ASSERT_OK(pool.CreateGroup("h"));
  CAIRN_ASSERT_OK(pool.AddToGroup("g", "a"));
  CAIRN_ASSERT_OK(pool.AddToGroup("g", "b"));
  CAIRN_ASSERT_OK(pool.CreateGroupSnap("g", "s"));
  CAIRN_ASSERT_OK(pool.RemoveFromGroup("g", "b"));
  CAIRN_ASSERT_OK(pool.CreateGroupSnap("g", "t"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> b, pool.Open("b"));
  EXPECT_TRUE(volume_test::OnlySnapNamed(*b, GroupSnapName("s")));
  EXPECT_FALSE(volume_test::OnlySnapNamed(*b, GroupSnapName("t")));

  CAIRN_ASSERT_OK(pool.AddToGroup("h", "b"));
  CAIRN_EXPECT_CODE(pool.CreateGroupSnap("h", "s"), Code::kAlreadyExists);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> snaps, pool.GroupSnaps("h"));
  EXPECT_TRUE(snaps.empty()) << "a refused group snapshot left a record";

  CAIRN_ASSERT_OK(pool.RemoveGroupSnap("g", "s"));
  EXPECT_FALSE(volume_test::OnlySnapNamed(*b, GroupSnapName("s")));
  CAIRN_ASSERT_OK(pool.CreateGroupSnap("h", "s"));
  EXPECT_TRUE(volume_test::OnlySnapNamed(*b, GroupSnapName("s")));
}

}  // namespace
}  // namespace cairn
