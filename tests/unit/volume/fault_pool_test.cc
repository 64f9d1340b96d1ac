// FaultPool (fault_pool.h) over the in-memory store: each fault point is
// asked once per operation, and a faulted operation fails with the fault
// and changes nothing. (The conformance suite also runs through a FaultPool
// with no fault: memory_volume_test.cc, and over RBD in ceph_tests.)
#include "engine/volume/fault_pool.h"

#include <fmt/format.h>

#include "engine/volume/memory_volume.h"
#include "tests/unit/test_util.h"
#include "tests/unit/volume/volume_test_util.h"

namespace cairn {
namespace {

using volume_test::kKiB;
using volume_test::kMiB;
using volume_test::Pattern;
using volume_test::ReadAt;
using volume_test::WriteAt;
using volume_test::ZeroAt;

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

// A group snapshot is one fault point for the whole group: faulted, no
// member gets a share. Listing the group is no fault point.
TEST(FaultPoolTest, AFaultedGroupSnapshotLeavesNoShare) {
  MemoryPool memory;
  FaultPool pool(memory);
  CAIRN_ASSERT_OK(memory.Create("a", kMiB));
  CAIRN_ASSERT_OK(memory.CreateGroup("g"));
  CAIRN_ASSERT_OK(memory.AddToGroup("g", "a"));
  std::vector<VolumeFaultPoint> asked;
  pool.SetFault([&](const VolumeFaultPoint& p) {
    asked.push_back(p);
    if (p.op == VolumeOp::kCreateGroupSnap || p.op == VolumeOp::kRemoveGroupSnap) {
      return Unavailable("injected");
    }
    return OkStatus();
  });
  CAIRN_EXPECT_CODE(pool.CreateGroupSnap("g", "s"), Code::kUnavailable);
  ASSERT_EQ(asked.size(), 1u);
  EXPECT_EQ(asked[0].image, "g");
  EXPECT_EQ(asked[0].snap, "s");
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> snaps, pool.GroupSnaps("g"));
  EXPECT_TRUE(snaps.empty());
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> images, pool.GroupImages("g"));
  EXPECT_EQ(images, std::vector<std::string>{"a"});
  EXPECT_EQ(asked.size(), 1u);

  CAIRN_ASSERT_OK(memory.CreateGroupSnap("g", "s"));
  CAIRN_EXPECT_CODE(pool.RemoveGroupSnap("g", "s"), Code::kUnavailable);
  pool.SetFault(nullptr);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool.Open("a"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> shares, v->ListSnaps());
  ASSERT_EQ(shares.size(), 1u);
  EXPECT_EQ(shares[0].name, GroupSnapName("s"));
  CAIRN_ASSERT_OK(pool.RemoveGroupSnap("g", "s"));
}

}  // namespace
}  // namespace cairn
