// The Volume conformance suite: one set of value-parameterized tests that
// every Pool/Volume implementation must pass (MemoryPool in
// tests/unit/volume/memory_volume_test.cc, RbdPool in tests/ceph/volume_rbd_test.cc).
//
// Diff assertions are written as properties both stores satisfy, not as
// exact extent lists, because the stores differ in granularity:
//  (a) applying the listed extents (bytes read at `to_snap` for kData, zeros
//      for kZero) onto a copy of `from_snap` yields exactly `to_snap`
//      (compared by XXH3 of the whole image): the property that matters;
//  (b) the listed bytes are bounded by the changed ranges, each rounded out
//      to the target's diff granularity (64 KiB chunks in memory, 4 MiB
//      objects on RBD).
//
// Usage: include this header in exactly ONE .cc of a test binary (it defines
// the TEST_Ps), then INSTANTIATE_TEST_SUITE_P(Name, VolumeConformanceTest,
// ::testing::Values(VolumeConformanceParam{...}), VolumeParamName). Wrap a
// param in ThroughFaultPool to run the suite through the fault layer too.
//
// Thread-safety: tests run on gtest's thread.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/status.h"
#include "engine/epoch/epoch.h"
#include "engine/volume/fault_pool.h"
#include "engine/volume/volume.h"
#include "tests/unit/volume/volume_test_util.h"

namespace cairn {

// What one instantiation of the suite tests.
struct VolumeTestTarget {
  std::unique_ptr<Pool> pool;
  // Upper bound of the granularity of DiffExtents (see (b) above).
  uint64_t diff_granularity = 0;
  // Prepended to every image name; unique per run (e.g. holds the pid).
  std::string name_prefix;
  // Volume::ChangedSince can answer "unchanged" (RBD: with fast-diff).
  bool tells_unchanged = true;
  // Makes group `group` of `images` (the Pool seam has no call for it: RBD
  // groups are the operator's). The group tests need it.
  std::function<Status(const std::string& group, const std::vector<std::string>& images)>
      make_group;
  // Removes group `group` with its snapshots, before the test's images go
  // (RBD refuses to remove a group's image). Null if nothing needs doing.
  std::function<Status(const std::string& group)> remove_group;
};

struct VolumeConformanceParam {
  std::string label;  // the instantiation's name in test output
  // Builds a fresh target for one test; an error fails the test.
  std::function<StatusOr<VolumeTestTarget>()> make;
};

inline void PrintTo(const VolumeConformanceParam& p, std::ostream* os) { *os << p.label; }

// A FaultPool that owns the pool it wraps, as a target holds one Pool.
class OwningFaultPool final : public FaultPool {
 public:
  explicit OwningFaultPool(std::unique_ptr<Pool> inner)
      : FaultPool(*inner), inner_(std::move(inner)) {}

 private:
  std::unique_ptr<Pool> inner_;
};

// `inner`'s target seen through a FaultPool with no fault installed: the
// suite then checks that the layer forwards every call as it is.
inline VolumeConformanceParam ThroughFaultPool(VolumeConformanceParam inner) {
  return {"FaultOver" + inner.label, [make = inner.make]() -> StatusOr<VolumeTestTarget> {
            ASSIGN_OR_RETURN(VolumeTestTarget t, make());
            t.pool = std::make_unique<OwningFaultPool>(std::move(t.pool));
            t.name_prefix += "fault-";  // apart from the images of `inner`
            return t;
          }};
}

inline std::string VolumeParamName(const ::testing::TestParamInfo<VolumeConformanceParam>& info) {
  return info.param.label;
}

class VolumeConformanceTest : public ::testing::TestWithParam<VolumeConformanceParam> {
 protected:
  void SetUp() override {
    StatusOr<VolumeTestTarget> target = GetParam().make();
    ASSERT_TRUE(target.ok()) << target.status().ToString();
    target_ = std::move(*target);
  }

  // Removes every image the test named, newest first (clones before their
  // parents). Volumes opened by the test body are closed by now.
  void TearDown() override {
    if (!target_.pool) return;
    for (const auto& group : groups_) {
      if (!target_.remove_group) break;
      Status s = target_.remove_group(group);
      EXPECT_TRUE(s.ok()) << "cleaning up group " << group << ": " << s.ToString();
    }
    for (auto it = names_.rbegin(); it != names_.rend(); ++it) {
      StatusOr<bool> exists = pool().Exists(*it);
      if (exists.ok() && *exists) {
        Status s = pool().Remove(*it);
        EXPECT_TRUE(s.ok()) << "cleaning up " << *it << ": " << s.ToString();
      }
    }
  }

  Pool& pool() { return *target_.pool; }
  const VolumeTestTarget& target() const { return target_; }
  uint64_t granularity() const { return target_.diff_granularity; }

  // A name unique to this run and test, removed at the end of the test.
  std::string NewName(std::string_view hint) {
    static std::atomic<int> counter{0};
    std::string name = target_.name_prefix + std::to_string(counter++) + "-" + std::string(hint);
    names_.push_back(name);
    return name;
  }

  // Creates an image and opens it.
  StatusOr<std::unique_ptr<Volume>> CreateAndOpen(std::string_view hint, uint64_t size) {
    const std::string name = NewName(hint);
    RETURN_IF_ERROR(pool().Create(name, size));
    return pool().Open(name);
  }

  // Makes a group of `images`, named uniquely to this run and test, and
  // removed at the end of the test.
  StatusOr<std::string> NewGroup(std::string_view hint, const std::vector<std::string>& images) {
    static std::atomic<int> counter{0};
    std::string group =
        target_.name_prefix + "group-" + std::to_string(counter++) + "-" + std::string(hint);
    RETURN_IF_ERROR(target_.make_group(group, images));
    groups_.push_back(group);
    return group;
  }

  VolumeTestTarget target_;
  std::vector<std::string> names_;
  std::vector<std::string> groups_;
};

// --- images ------------------------------------------------------------------

TEST_P(VolumeConformanceTest, CreateOpenExistsRemove) {
  using namespace volume_test;
  const std::string name = NewName("basic");
  CAIRN_ASSERT_OK_AND_ASSIGN(bool exists, pool().Exists(name));
  EXPECT_FALSE(exists);
  CAIRN_EXPECT_CODE(pool().Open(name).status(), Code::kNotFound);

  CAIRN_ASSERT_OK(pool().Create(name, 8 * kMiB + 512));
  CAIRN_EXPECT_CODE(pool().Create(name, kMiB), Code::kAlreadyExists);
  CAIRN_ASSERT_OK_AND_ASSIGN(exists, pool().Exists(name));
  EXPECT_TRUE(exists);
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool().Open(name));
    EXPECT_EQ(v->name(), name);
    CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t size, v->Size());
    EXPECT_EQ(size, 8 * kMiB + 512);
    CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
    EXPECT_TRUE(snaps.empty());
  }
  CAIRN_ASSERT_OK(pool().Remove(name));
  CAIRN_ASSERT_OK_AND_ASSIGN(exists, pool().Exists(name));
  EXPECT_FALSE(exists);
  CAIRN_EXPECT_CODE(pool().Remove(name), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool().Open(name).status(), Code::kNotFound);
}

TEST_P(VolumeConformanceTest, RemoveWhileOpenFailsAndKeepsTheImage) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("busy", 4 * kMiB));
  const std::string name = v->name();
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(1, 4096)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  const Status s = pool().Remove(name);
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  // Nothing was removed, not even the snapshot.
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  v.reset();
  CAIRN_ASSERT_OK(pool().Remove(name));  // with its snapshot
  CAIRN_ASSERT_OK_AND_ASSIGN(bool exists, pool().Exists(name));
  EXPECT_FALSE(exists);
}

TEST_P(VolumeConformanceTest, HandlesShareTheImage) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> a, CreateAndOpen("shared", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> b, pool().Open(a->name()));
  const std::string data = Pattern(2, 10000);
  CAIRN_ASSERT_OK(WriteAt(*a, 777, data));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*b, "", 777, data.size()));
  EXPECT_TRUE(got == data);
  CAIRN_ASSERT_OK(a->Resize(6 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t size, b->Size());
  EXPECT_EQ(size, 6 * kMiB);
  CAIRN_ASSERT_OK(b->CreateSnap("by-b"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, a->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  EXPECT_EQ(snaps[0].name, "by-b");
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> c, pool().Open(a->name()));
  CAIRN_ASSERT_OK_AND_ASSIGN(got, ReadAt(*c, "by-b", 777, data.size()));
  EXPECT_TRUE(got == data);
}

// --- asynchronous I/O --------------------------------------------------------

TEST_P(VolumeConformanceTest, RoundTripOnAnOddSize) {
  using namespace volume_test;
  // Not a multiple of the 4 MiB object size, nor of 512.
  const uint64_t size = 10 * kMiB + 12345;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("odd", size));
  std::string model(size, '\0');
  const std::vector<Range> writes = {
      {0, 4096},                     // first block
      {4 * kMiB - 100, 200},         // across an object boundary
      {6 * kMiB + 1, 3 * kMiB + 7},  // large, unaligned, several pieces
      {size - 777, 777},             // the very end
      {123457, 1},                   // one byte
  };
  uint64_t seed = 10;
  for (const auto& w : writes) {
    const std::string data = Pattern(seed++, w.length);
    CAIRN_ASSERT_OK(WriteAt(*v, w.offset, data));
    model.replace(w.offset, w.length, data);
  }
  // A zero in the middle of written data, unaligned: exact zeros, not skipped.
  CAIRN_ASSERT_OK(ZeroAt(*v, 6 * kMiB + 1000, 333));
  std::memset(model.data() + 6 * kMiB + 1000, 0, 333);

  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadImage(*v, ""));
  ASSERT_EQ(got.size(), model.size());
  EXPECT_TRUE(got == model) << "image content differs from the model";
  CAIRN_ASSERT_OK_AND_ASSIGN(got, ReadAt(*v, "", size - 1000, 1000));
  EXPECT_TRUE(got == model.substr(size - 1000));

  // Past the end: refused at start, nothing in flight.
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo(""));
  std::string buf(20, 'x');
  CAIRN_EXPECT_CODE(io->StartWrite(1, size - 10, buf), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(io->StartRead(2, size - 10, std::span<char>(buf)), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(io->StartRead(3, size + 4096, std::span<char>(buf)), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(io->StartZero(4, size - 10, 20), Code::kInvalidArgument);
  EXPECT_EQ(io->InFlight(), 0u);
  CAIRN_ASSERT_OK(io->Drain());
  CAIRN_ASSERT_OK_AND_ASSIGN(got, ReadAt(*v, "", size - 10, 10));
  EXPECT_TRUE(got == model.substr(size - 10));
}

TEST_P(VolumeConformanceTest, WaitOneReturnsEveryTagOnce) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("tags", 8 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo(""));
  std::vector<std::string> bufs;
  for (int i = 0; i < 6; ++i) bufs.push_back(Pattern(100 + i, 64 * kKiB));
  for (int i = 0; i < 6; ++i) {
    CAIRN_ASSERT_OK(io->StartWrite(1000 + i, i * kMiB + 512, bufs[i]));
  }
  EXPECT_EQ(io->InFlight(), 6u);
  std::multiset<uint64_t> tags;
  while (io->InFlight() > 0) {
    AsyncIo::Completion c = io->WaitOne();
    EXPECT_TRUE(c.status.ok()) << c.status.ToString();
    tags.insert(c.tag);
  }
  EXPECT_EQ(tags, (std::multiset<uint64_t>{1000, 1001, 1002, 1003, 1004, 1005}));
  CAIRN_ASSERT_OK(io->Drain());
  for (int i = 0; i < 6; ++i) {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "", i * kMiB + 512, 64 * kKiB));
    EXPECT_TRUE(got == bufs[i]) << "write " << i;
  }
}

TEST_P(VolumeConformanceTest, SnapshotIsReadOnlyAndKeepsOldContent) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("snapread", 6 * kMiB));
  const std::string before = Pattern(20, 2 * kMiB);
  CAIRN_ASSERT_OK(WriteAt(*v, kMiB, before));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  const std::string after = Pattern(21, 2 * kMiB);
  CAIRN_ASSERT_OK(WriteAt(*v, kMiB, after));
  CAIRN_ASSERT_OK(ZeroAt(*v, 0, 6 * kMiB - 4096));

  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "s1", kMiB, before.size()));
  EXPECT_TRUE(got == before) << "the snapshot changed with the head";
  CAIRN_ASSERT_OK_AND_ASSIGN(got, ReadAt(*v, "", kMiB, before.size()));
  EXPECT_EQ(got, std::string(before.size(), '\0'));

  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo("s1"));
  CAIRN_EXPECT_CODE(io->StartWrite(1, 0, after), Code::kFailedPrecondition);
  CAIRN_EXPECT_CODE(io->StartZero(2, 0, 4096), Code::kFailedPrecondition);
  EXPECT_EQ(io->InFlight(), 0u);
  CAIRN_EXPECT_CODE(v->OpenIo("no-such-snap").status(), Code::kNotFound);
}

// --- snapshots ---------------------------------------------------------------

// Reads of a snapshot removed under them may succeed with zeros (RADOS
// reads trimmed objects as absent): ConfirmSnap is what tells.
TEST_P(VolumeConformanceTest, ConfirmSnapFindsSnapshotsAndImagesGoneUnderAReader) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("gone", 8 * kMiB));
  const std::string name = v->name();
  const std::string data = Pattern(30, 8 * kMiB);
  CAIRN_ASSERT_OK(WriteAt(*v, 0, data));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 2u);
  const uint64_t id1 = snaps[0].id;
  const uint64_t id2 = snaps[1].id;
  v.reset();  // no read-write handle left: the image may be removed

  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> reader, pool().Open(name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*reader, "s1", 0, kMiB));
  EXPECT_TRUE(got == data.substr(0, kMiB));
  CAIRN_EXPECT_OK(reader->ConfirmSnap("s1", id1));
  CAIRN_EXPECT_OK(reader->ConfirmSnap("s2", id2));
  CAIRN_EXPECT_CODE(reader->ConfirmSnap("s1", id2), Code::kNotFound);
  CAIRN_EXPECT_CODE(reader->ConfirmSnap("no-such-snap", id1), Code::kNotFound);

  // s1 removed while a handle reads it.
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, reader->OpenIo("s1"));
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> other, pool().Open(name));
    CAIRN_ASSERT_OK(other->RemoveSnap("s1"));
  }
  std::string buf(kMiB, 'y');
  if (Status st = io->StartRead(1, 4 * kMiB, std::span<char>(buf)); st.ok()) {
    const Status done = io->WaitOne().status;
    // Whatever it returned (an error, zeros, or what is not trimmed yet),
    // only ConfirmSnap may be trusted.
    std::printf("[          ] a read of a removed snapshot: %s\n",
                !done.ok()                           ? done.ToString().c_str()
                : buf == std::string(kMiB, '\0')     ? "zeros, no error"
                : buf == data.substr(4 * kMiB, kMiB) ? "the old data"
                                                     : "other bytes");
  }
  io.reset();
  CAIRN_EXPECT_CODE(reader->ConfirmSnap("s1", id1), Code::kNotFound);
  CAIRN_EXPECT_OK(reader->ConfirmSnap("s2", id2));

  // Renamed away, then back: the same image again.
  CAIRN_ASSERT_OK(pool().Rename(name, name + "-moved"));
  CAIRN_EXPECT_CODE(reader->ConfirmSnap("s2", id2), Code::kNotFound);
  CAIRN_ASSERT_OK(pool().Rename(name + "-moved", name));
  CAIRN_EXPECT_OK(reader->ConfirmSnap("s2", id2));

  // Removed, and another image made under its name, with a snapshot of
  // the same name: not the image read.
  CAIRN_ASSERT_OK(pool().Remove(name));
  CAIRN_EXPECT_CODE(reader->ConfirmSnap("s2", id2), Code::kNotFound);
  CAIRN_ASSERT_OK(pool().Create(name, 8 * kMiB));
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> again, pool().Open(name));
    CAIRN_ASSERT_OK(again->CreateSnap("s2"));
  }
  CAIRN_EXPECT_CODE(reader->ConfirmSnap("s2", id2), Code::kNotFound);
  CAIRN_ASSERT_OK(pool().Remove(name));
}

TEST_P(VolumeConformanceTest, ChangedSinceSeesEveryKindOfChange) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("changed", 16 * kMiB));
  const auto snap = [&](const std::string& name) -> SnapInfo {
    EXPECT_TRUE(v->CreateSnap(name).ok());
    auto snaps = v->ListSnaps();
    EXPECT_TRUE(snaps.ok());
    return snaps.ok() && !snaps->empty() ? snaps->back() : SnapInfo{};
  };
  const auto changed = [&](const SnapInfo& s) {
    auto c = v->ChangedSince(s);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() && *c;
  };
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(50, 6 * kMiB)));
  const SnapInfo s1 = snap("s1");
  // A store that cannot tell says "changed" always; one that can must.
  const bool tells = target().tells_unchanged;
  EXPECT_EQ(changed(s1), !tells) << "nothing was written since s1";
  EXPECT_EQ(changed(s1), !tells) << "asking twice changes nothing";
  for (int i = 0; i < 24; ++i) {  // RBD: quick checks, and full ones between
    ASSERT_EQ(changed(s1), !tells) << "asked " << i + 3 << " times";
  }
  CAIRN_ASSERT_OK(WriteAt(*v, 5 * kMiB, Pattern(51, 4096)));  // over data
  EXPECT_TRUE(changed(s1));
  const SnapInfo s2 = snap("s2");
  EXPECT_EQ(changed(s2), !tells);
  CAIRN_ASSERT_OK(WriteAt(*v, 12 * kMiB, Pattern(52, 4096)));  // where there was none
  EXPECT_TRUE(changed(s2));
  const SnapInfo s3 = snap("s3");
  CAIRN_ASSERT_OK(ZeroAt(*v, 0, 4 * kMiB));  // a whole object gone
  EXPECT_TRUE(changed(s3));
  const SnapInfo s4 = snap("s4");
  CAIRN_ASSERT_OK(v->Resize(20 * kMiB));
  EXPECT_TRUE(changed(s4));
  const SnapInfo s5 = snap("s5");
  // Written, then another snapshot taken: still changed since s5.
  CAIRN_ASSERT_OK(WriteAt(*v, 8 * kMiB, Pattern(53, 4096)));
  snap("s6");
  EXPECT_TRUE(changed(s5));
}

// What the sink does before an epoch whose base is `point` when the head
// may hold writes of an epoch that never completed.
TEST_P(VolumeConformanceTest, RevertToPointPutsBackEveryChangeSinceIt) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("revert", 12 * kMiB));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(40, 6 * kMiB)));
  CAIRN_ASSERT_OK(WriteAt(*v, 10 * kMiB, Pattern(41, kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("point"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  CAIRN_ASSERT_OK_AND_ASSIGN(const uint64_t want, HashImage(*v, "point"));
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t reverted, RevertToPoint(*v, snaps[0]));
  EXPECT_EQ(reverted, 0u) << "nothing changed since the point";

  // An epoch that never completed: data over data, data where there was
  // none, zeros over data, and the image cut short, then grown again.
  CAIRN_ASSERT_OK(WriteAt(*v, kMiB, Pattern(42, 64 * kKiB)));
  CAIRN_ASSERT_OK(WriteAt(*v, 7 * kMiB, Pattern(43, 128 * kKiB)));
  CAIRN_ASSERT_OK(ZeroAt(*v, 4 * kMiB, kMiB));
  CAIRN_ASSERT_OK(v->Resize(9 * kMiB));
  CAIRN_ASSERT_OK(v->Resize(14 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(const uint64_t dirty, HashImage(*v, ""));
  ASSERT_NE(dirty, want);
  CAIRN_ASSERT_OK_AND_ASSIGN(reverted, RevertToPoint(*v, snaps[0]));
  EXPECT_GE(reverted, 64 * kKiB + 128 * kKiB + kMiB);
  CAIRN_ASSERT_OK_AND_ASSIGN(const uint64_t got, HashImage(*v, ""));
  EXPECT_EQ(got, want) << "the head is not the point again";
  CAIRN_ASSERT_OK_AND_ASSIGN(const uint64_t size, v->Size());
  EXPECT_EQ(size, 12 * kMiB);
}

TEST_P(VolumeConformanceTest, SnapshotsListInCreationOrderWithTimes) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("snaps", 4 * kMiB));
  const int64_t before = NowNs();
  CAIRN_ASSERT_OK(v->CreateSnap("zeta"));
  CAIRN_ASSERT_OK(v->Resize(5 * kMiB));
  CAIRN_ASSERT_OK(v->CreateSnap("alpha"));
  CAIRN_ASSERT_OK(v->Resize(3 * kMiB));
  CAIRN_ASSERT_OK(v->CreateSnap("mid"));
  const int64_t after = NowNs();
  CAIRN_EXPECT_CODE(v->CreateSnap("alpha"), Code::kAlreadyExists);

  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 3u);
  EXPECT_EQ(snaps[0].name, "zeta");
  EXPECT_EQ(snaps[1].name, "alpha");
  EXPECT_EQ(snaps[2].name, "mid");
  EXPECT_EQ(snaps[0].size, 4 * kMiB);
  EXPECT_EQ(snaps[1].size, 5 * kMiB);
  EXPECT_EQ(snaps[2].size, 3 * kMiB);
  constexpr int64_t kSlack = 2'000'000'000;  // the cluster's clock, coarse units
  for (size_t i = 0; i < snaps.size(); ++i) {
    EXPECT_GE(snaps[i].time_ns, before - kSlack) << snaps[i].name;
    EXPECT_LE(snaps[i].time_ns, after + kSlack) << snaps[i].name;
    if (i > 0) {
      EXPECT_GT(snaps[i].id, snaps[i - 1].id);
      EXPECT_GE(snaps[i].time_ns, snaps[i - 1].time_ns);
    }
  }

  CAIRN_ASSERT_OK(v->RemoveSnap("alpha"));
  CAIRN_EXPECT_CODE(v->RemoveSnap("alpha"), Code::kNotFound);
  CAIRN_ASSERT_OK_AND_ASSIGN(snaps, v->ListSnaps());
  ASSERT_EQ(snaps.size(), 2u);
  EXPECT_EQ(snaps[0].name, "zeta");
  EXPECT_EQ(snaps[1].name, "mid");
}

// What the sink does epoch after epoch on one handle: many small writes
// (several per RADOS object), then a snapshot taken for this process only
// (no settling). Every snapshot must hold the image as it was
// when it was taken, and the diffs between them the writes in between.
TEST_P(VolumeConformanceTest, EpochsOfSmallWritesThenSnapshotsForThisProcessOnly) {
  using namespace volume_test;
  constexpr uint64_t kSize = 12 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("ownsnaps", kSize));
  std::string image(kSize, '\0');
  std::vector<std::string> held;
  for (uint64_t epoch = 0; epoch < 3; ++epoch) {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo(""));
    std::vector<std::string> data;
    for (uint64_t i = 0; i < 24; ++i) {  // ascending, 500 KiB apart, 64 KiB each
      data.push_back(Pattern(1000 * epoch + i, 65536));
    }
    uint64_t tag = 0;
    for (const std::string& d : data) {
      if (io->InFlight() >= kWindow) CAIRN_ASSERT_OK(io->WaitOne().status);
      const uint64_t at = tag * 500 * 1024 + epoch * 4096;
      CAIRN_ASSERT_OK(io->StartWrite(tag++, at, d));
      image.replace(at, d.size(), d);
    }
    CAIRN_ASSERT_OK(io->Drain());
    const std::string snap = "own" + std::to_string(epoch);
    CAIRN_ASSERT_OK(v->CreateSnap(snap, Volume::Writers::kThisProcessOnly));
    CAIRN_EXPECT_CODE(v->CreateSnap(snap, Volume::Writers::kThisProcessOnly), Code::kAlreadyExists);
    held.push_back(image);
  }
  for (uint64_t epoch = 0; epoch < 3; ++epoch) {
    const std::string snap = "own" + std::to_string(epoch);
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, snap, 0, kSize));
    EXPECT_TRUE(got == held[epoch]) << "snapshot " << snap << " does not hold its epoch";
    if (epoch == 0) continue;
    CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d,
                               CollectDiff(*v, "own" + std::to_string(epoch - 1), snap));
    std::string rebuilt = held[epoch - 1];
    for (const Extent& e : d) {
      if (e.kind == RecordKind::kData) {
        rebuilt.replace(e.offset, e.length, got, e.offset, e.length);
      } else {
        rebuilt.replace(e.offset, e.length, std::string(e.length, '\0'));
      }
    }
    EXPECT_TRUE(rebuilt == held[epoch])
        << "the diff to " << snap << " misses writes: " << Describe(d);
  }
}

// --- DiffExtents -------------------------------------------------------------

TEST_P(VolumeConformanceTest, DiffFromEmptyListsOnlyWrittenData) {
  using namespace volume_test;
  const uint64_t size = 64 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("sparse", size));
  const std::vector<Range> writes = {{100, 5000}, {6 * kMiB, 4096}, {40 * kMiB + 12345, 300000}};
  uint64_t seed = 30;
  for (const auto& w : writes) CAIRN_ASSERT_OK(WriteAt(*v, w.offset, Pattern(seed++, w.length)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));

  std::vector<Extent> listed;
  EXPECT_TRUE(DiffReconstructs(*v, "", "s1", writes, granularity(), &listed));
  for (const auto& e : listed) EXPECT_EQ(e.kind, RecordKind::kData) << e.offset;
  for (const auto& w : writes) {
    EXPECT_TRUE(Covers(listed, RecordKind::kData, w.offset, w.length)) << w.offset;
  }
  EXPECT_LT(TotalLength(listed), size / 4) << "a sparse image must stay sparse";
  // The head, with nothing changed since s1, lists the same data.
  EXPECT_TRUE(DiffReconstructs(*v, "", "", writes, granularity()));
}

TEST_P(VolumeConformanceTest, DiffBetweenSnapshotsListsTheChanges) {
  using namespace volume_test;
  const uint64_t size = 24 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("between", size));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(40, 20 * kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  const std::vector<Range> changes = {{50, 10}, {5 * kMiB + 3, 70000}, {17 * kMiB, kMiB}};
  uint64_t seed = 41;
  for (const auto& c : changes) CAIRN_ASSERT_OK(WriteAt(*v, c.offset, Pattern(seed++, c.length)));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK(WriteAt(*v, 22 * kMiB, Pattern(49, 4096)));  // after s2: not in s1 -> s2

  std::vector<Extent> listed;
  EXPECT_TRUE(DiffReconstructs(*v, "s1", "s2", changes, granularity(), &listed));
  for (const auto& c : changes) {
    EXPECT_TRUE(Covers(listed, RecordKind::kData, c.offset, c.length)) << c.offset;
  }
  // Nothing changed between a snapshot and itself.
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> none, CollectDiff(*v, "s2", "s2"));
  EXPECT_TRUE(none.empty()) << Describe(none);
  // s2 -> head: only the last write.
  EXPECT_TRUE(DiffReconstructs(*v, "s2", "", {{22 * kMiB, 4096}}, granularity()));
  // s1 -> head: both.
  std::vector<Range> all = changes;
  all.push_back({22 * kMiB, 4096});
  EXPECT_TRUE(DiffReconstructs(*v, "s1", "", all, granularity()));
}

TEST_P(VolumeConformanceTest, ZeroBetweenSnapshotsIsListed) {
  using namespace volume_test;
  const uint64_t size = 16 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("zero", size));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(50, 8 * kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  const std::vector<Range> zeros = {
      {4 * kMiB, 4 * kMiB},   // whole object-aligned range: must read back as a hole
      {kMiB + 4096, 8192},    // small and unaligned: exact zeros
      {10 * kMiB, 2 * kMiB},  // never written (a discard of a hole)
      {8 * kMiB - 100, 50},   // the tail of the data
  };
  for (const auto& z : zeros) CAIRN_ASSERT_OK(ZeroAt(*v, z.offset, z.length));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));

  std::vector<Extent> listed;
  EXPECT_TRUE(DiffReconstructs(*v, "s1", "s2", zeros, granularity(), &listed));
  EXPECT_TRUE(Covers(listed, RecordKind::kZero, 4 * kMiB, 4 * kMiB - 4 * kKiB))
      << "a zeroed range must be listed as kZero: " << Describe(listed);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "s2", kMiB + 4096, 8192));
  EXPECT_EQ(got, std::string(8192, '\0'));
  // From the empty image the zeroed object holds nothing worth listing.
  const std::vector<Range> data_left = {{0, 4 * kMiB}};
  EXPECT_TRUE(DiffReconstructs(*v, "", "s2", data_left, granularity()));
}

TEST_P(VolumeConformanceTest, DiffAcrossGrowth) {
  using namespace volume_test;
  const uint64_t small = 6 * kMiB + 4321;
  const uint64_t large = 40 * kMiB + 999;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("grow", small));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(60, small)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(v->Resize(large));
  // The grown region reads as zeros.
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "", small, 100000));
  EXPECT_EQ(got, std::string(100000, '\0'));
  const std::vector<Range> changes = {{30 * kMiB + 7, 12345}};
  CAIRN_ASSERT_OK(WriteAt(*v, changes[0].offset, Pattern(61, changes[0].length)));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));

  std::vector<Extent> listed;
  EXPECT_TRUE(DiffReconstructs(*v, "s1", "s2", changes, granularity(), &listed));
  EXPECT_TRUE(Covers(listed, RecordKind::kData, changes[0].offset, changes[0].length));
}

TEST_P(VolumeConformanceTest, DiffAcrossShrink) {
  using namespace volume_test;
  const uint64_t large = 16 * kMiB;
  const uint64_t small = 5 * kMiB + 777;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("shrink", large));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(70, large)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(v->Resize(small));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  // The cut: the object holding the new end is truncated.
  const std::vector<Range> cut = {{small - 1, large - small + 1}};
  std::vector<Extent> listed;
  EXPECT_TRUE(DiffReconstructs(*v, "s1", "s2", cut, granularity(), &listed));

  // Growing again: what was cut reads as zeros, and a diff from before the
  // shrink says so.
  CAIRN_ASSERT_OK(v->Resize(large));
  CAIRN_ASSERT_OK(v->CreateSnap("s3"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "", small, large - small));
  EXPECT_EQ(got, std::string(large - small, '\0'));
  EXPECT_TRUE(DiffReconstructs(*v, "s1", "s3", cut, granularity()));
  EXPECT_TRUE(DiffReconstructs(*v, "s2", "s3", {}, granularity()));
}

TEST_P(VolumeConformanceTest, DiffStopsAtTheCallbacksError) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("stop", 32 * kMiB));
  for (uint64_t i = 0; i < 4; ++i) {
    CAIRN_ASSERT_OK(WriteAt(*v, i * 8 * kMiB, Pattern(80 + i, 4096)));
  }
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  int calls = 0;
  const Status s = v->DiffExtents("", "s1", [&](const Extent&) {
    ++calls;
    return Aborted("stop here");
  });
  EXPECT_EQ(s.code(), Code::kAborted) << s.ToString();
  EXPECT_NE(s.message().find("stop here"), std::string::npos) << s.ToString();
  EXPECT_EQ(calls, 1);
}

TEST_P(VolumeConformanceTest, DiffRejectsMissingAndReversedSnapshots) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("diffargs", 4 * kMiB));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(90, 4096)));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  auto ignore = [](const Extent&) { return OkStatus(); };
  CAIRN_EXPECT_CODE(v->DiffExtents("nope", "s2", ignore), Code::kNotFound);
  CAIRN_EXPECT_CODE(v->DiffExtents("s1", "nope", ignore), Code::kNotFound);
  CAIRN_EXPECT_CODE(v->DiffExtents("s2", "s1", ignore), Code::kInvalidArgument);
}

// A seeded random history of writes, zeros and resizes with snapshots in
// between; every pair of points must diff into a faithful reconstruction.
TEST_P(VolumeConformanceTest, RandomHistoryDiffsReconstruct) {
  using namespace volume_test;
  const uint64_t seed = 20240611;
  SCOPED_TRACE("seed " + std::to_string(seed));
  uint64_t x = seed;
  auto next = [&](uint64_t n) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    return (x >> 33) % n;
  };
  uint64_t size = 12 * kMiB + 4096;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("random", size));
  struct Change {
    int epoch;
    Range range;
  };
  std::vector<Change> changes;
  std::vector<std::string> points = {""};  // "" = the empty image
  for (int epoch = 1; epoch <= 4; ++epoch) {
    for (int op = 0; op < 8; ++op) {
      const uint64_t kind = next(10);
      if (kind < 6) {
        const uint64_t off = next(size);
        const uint64_t len = 1 + next(std::min<uint64_t>(size - off, 2 * kMiB));
        CAIRN_ASSERT_OK(WriteAt(*v, off, Pattern(x, len)));
        changes.push_back({epoch, {off, len}});
      } else if (kind < 9) {
        const uint64_t off = next(size);
        const uint64_t len = 1 + next(std::min<uint64_t>(size - off, 5 * kMiB));
        CAIRN_ASSERT_OK(ZeroAt(*v, off, len));
        changes.push_back({epoch, {off, len}});
      } else {
        const uint64_t new_size = 4 * kMiB + next(16 * kMiB);
        CAIRN_ASSERT_OK(v->Resize(new_size));
        if (new_size < size) changes.push_back({epoch, {new_size - 1, size - new_size + 1}});
        size = new_size;
      }
    }
    points.push_back("e" + std::to_string(epoch));
    CAIRN_ASSERT_OK(v->CreateSnap(points.back()));
  }
  for (size_t i = 0; i < points.size(); ++i) {
    for (size_t j = i + 1; j < points.size(); ++j) {
      std::vector<Range> between;
      for (const auto& c : changes) {
        if (c.epoch > static_cast<int>(i) && c.epoch <= static_cast<int>(j)) {
          between.push_back(c.range);
        }
      }
      EXPECT_TRUE(DiffReconstructs(*v, points[i], points[j], between, granularity()))
          << points[i] << " -> " << points[j];
    }
  }
}

TEST_P(VolumeConformanceTest, DiffOfALargeSparseImageListsOnlyItsData) {
  using namespace volume_test;
  const uint64_t size = 10 * kGiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("big", size));
  const std::vector<Range> writes = {
      {0, kMiB},
      {3 * kGiB + 4 * kMiB + 64 * kKiB, kMiB},
      {7 * kGiB + 123, kMiB},
      {size - kMiB, kMiB},
  };
  uint64_t seed = 100;
  for (const auto& w : writes) CAIRN_ASSERT_OK(WriteAt(*v, w.offset, Pattern(seed++, w.length)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));

  std::vector<Extent> listed;
  const auto start = std::chrono::steady_clock::now();
  CAIRN_ASSERT_OK(v->DiffExtents("", "s1", [&](const Extent& e) {
    listed.push_back(e);
    return OkStatus();
  }));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf(
      "[          ] %s: DiffExtents(\"\", s1) on a 10 GiB image: %zu extents, %llu "
      "bytes, %.3f s\n",
      GetParam().label.c_str(), listed.size(), static_cast<unsigned long long>(TotalLength(listed)),
      seconds);
  RecordProperty("diff_10gib_seconds", std::to_string(seconds));
  EXPECT_TRUE(WellFormed(listed, size));
  EXPECT_LE(TotalLength(listed), 16 * kMiB) << Describe(listed);
  EXPECT_LE(TotalLength(listed), RoundedOutBytes(writes, granularity(), size));
  for (const auto& w : writes) {
    EXPECT_TRUE(Covers(listed, RecordKind::kData, w.offset, w.length)) << w.offset;
    // The listed bytes are the written ones.
    for (const auto& e : listed) {
      const uint64_t lo = std::max(e.offset, w.offset);
      const uint64_t hi = std::min(e.offset + e.length, w.offset + w.length);
      if (lo >= hi) continue;
      CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*v, "s1", lo, hi - lo));
      EXPECT_TRUE(got ==
                  Pattern(100 + (&w - writes.data()), w.length).substr(lo - w.offset, hi - lo));
    }
  }

  // An incremental diff on the same image lists only the new change.
  const Range change = {5 * kGiB + 777, 256 * kKiB};
  CAIRN_ASSERT_OK(WriteAt(*v, change.offset, Pattern(110, change.length)));
  CAIRN_ASSERT_OK(ZeroAt(*v, 0, 4096));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> inc, CollectDiff(*v, "s1", "s2"));
  EXPECT_TRUE(WellFormed(inc, size));
  EXPECT_LE(TotalLength(inc), RoundedOutBytes({change, {0, 4096}}, granularity(), size))
      << Describe(inc);
  EXPECT_TRUE(Covers(inc, RecordKind::kData, change.offset, change.length)) << Describe(inc);
}

// --- Clone and Copy ----------------------------------------------------------

TEST_P(VolumeConformanceTest, CloneReadsAsTheSnapshotAndPinsIt) {
  using namespace volume_test;
  const uint64_t size = 9 * kMiB + 100;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> src, CreateAndOpen("parent", size));
  CAIRN_ASSERT_OK(WriteAt(*src, 0, Pattern(120, 3 * kMiB)));
  CAIRN_ASSERT_OK(WriteAt(*src, 8 * kMiB, Pattern(121, kMiB + 100)));
  CAIRN_ASSERT_OK(src->CreateSnap("s1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t snap_hash, HashImage(*src, "s1"));

  const std::string clone_name = NewName("clone");
  CAIRN_EXPECT_CODE(pool().Clone(src->name(), "nope", clone_name), Code::kNotFound);
  CAIRN_ASSERT_OK(pool().Clone(src->name(), "s1", clone_name));
  CAIRN_EXPECT_CODE(pool().Clone(src->name(), "s1", clone_name), Code::kAlreadyExists);
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> clone, pool().Open(clone_name));
    CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t clone_size, clone->Size());
    EXPECT_EQ(clone_size, size);
    CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t h, HashImage(*clone, ""));
    EXPECT_EQ(h, snap_hash);
    // From the empty image, a clone lists its parent's data too.
    EXPECT_TRUE(
        DiffReconstructs(*clone, "", "", {{0, 3 * kMiB}, {8 * kMiB, kMiB + 100}}, granularity()));

    // The parent's head and the clone are independent.
    CAIRN_ASSERT_OK(WriteAt(*src, 0, Pattern(122, kMiB)));
    CAIRN_ASSERT_OK_AND_ASSIGN(h, HashImage(*clone, ""));
    EXPECT_EQ(h, snap_hash);
    CAIRN_ASSERT_OK(WriteAt(*clone, 4 * kMiB, Pattern(123, kMiB)));
    CAIRN_ASSERT_OK_AND_ASSIGN(h, HashImage(*src, "s1"));
    EXPECT_EQ(h, snap_hash);
  }
  // The snapshot is pinned while the clone exists.
  const Status pinned = src->RemoveSnap("s1");
  EXPECT_EQ(pinned.code(), Code::kFailedPrecondition) << pinned.ToString();
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, src->ListSnaps());
  EXPECT_EQ(snaps.size(), 1u);
  const std::string src_name = src->name();
  src.reset();
  CAIRN_EXPECT_CODE(pool().Remove(src_name), Code::kFailedPrecondition);
  CAIRN_ASSERT_OK(pool().Remove(clone_name));
  CAIRN_ASSERT_OK_AND_ASSIGN(src, pool().Open(src_name));
  CAIRN_ASSERT_OK(src->RemoveSnap("s1"));
}

// Failback keeps a divergent primary's later snapshots under new names;
// a clone of a renamed snapshot keeps reading it.
TEST_P(VolumeConformanceTest, RenameSnapKeepsItsContentTimeAndClones) {
  using namespace volume_test;
  const uint64_t size = 4 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("rename", size));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(130, kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("cairn.3"));
  CAIRN_ASSERT_OK(v->CreateSnap("other"));
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t h, HashImage(*v, "cairn.3"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> before, v->ListSnaps());
  const std::string clone_name = NewName("renamedclone");
  CAIRN_ASSERT_OK(pool().Clone(v->name(), "cairn.3", clone_name));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(131, kMiB)));

  CAIRN_EXPECT_CODE(v->RenameSnap("nope", "x"), Code::kNotFound);
  CAIRN_EXPECT_CODE(v->RenameSnap("cairn.3", "other"), Code::kAlreadyExists);
  CAIRN_ASSERT_OK(v->RenameSnap("cairn.3", "cairn-divergent-x.cairn.3"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> after, v->ListSnaps());
  ASSERT_EQ(after.size(), 2u);
  EXPECT_EQ(after[0].name, "cairn-divergent-x.cairn.3");
  EXPECT_EQ(after[0].id, before[0].id);
  EXPECT_EQ(after[0].time_ns, before[0].time_ns);
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t renamed, HashImage(*v, "cairn-divergent-x.cairn.3"));
  EXPECT_EQ(renamed, h);
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> clone, pool().Open(clone_name));
    CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t c, HashImage(*clone, ""));
    EXPECT_EQ(c, h);
  }
  CAIRN_ASSERT_OK(pool().Remove(clone_name));
  CAIRN_ASSERT_OK(v->RemoveSnap("cairn-divergent-x.cairn.3"));
  CAIRN_ASSERT_OK(v->RemoveSnap("other"));
}

TEST_P(VolumeConformanceTest, CopyIsAnIndependentSparseCopy) {
  using namespace volume_test;
  const uint64_t size = 20 * kMiB + 12345;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> src, CreateAndOpen("orig", size));
  const std::vector<Range> writes = {{4096, 2 * kMiB}, {9 * kMiB + 5, 3 * kMiB}, {size - 999, 999}};
  uint64_t seed = 130;
  for (const auto& w : writes) CAIRN_ASSERT_OK(WriteAt(*src, w.offset, Pattern(seed++, w.length)));
  CAIRN_ASSERT_OK(src->CreateSnap("s1"));
  CAIRN_ASSERT_OK(WriteAt(*src, 0, Pattern(139, 8 * kMiB)));  // after s1: not copied
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t snap_hash, HashImage(*src, "s1"));

  const std::string copy_name = NewName("copy");
  CAIRN_EXPECT_CODE(pool().Copy(src->name(), "nope", copy_name, nullptr), Code::kNotFound);
  std::vector<std::pair<uint64_t, uint64_t>> progress;
  CAIRN_ASSERT_OK(pool().Copy(src->name(), "s1", copy_name, [&](uint64_t done, uint64_t total) {
    progress.emplace_back(done, total);
  }));
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.back(), std::make_pair(size, size));
  for (size_t i = 1; i < progress.size(); ++i) EXPECT_GE(progress[i].first, progress[i - 1].first);
  CAIRN_EXPECT_CODE(pool().Copy(src->name(), "s1", copy_name, nullptr), Code::kAlreadyExists);

  // Independent of its source: remove the source with its snapshot.
  const std::string src_name = src->name();
  src.reset();
  CAIRN_ASSERT_OK(pool().Remove(src_name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> copy, pool().Open(copy_name));
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t copy_size, copy->Size());
  EXPECT_EQ(copy_size, size);
  CAIRN_ASSERT_OK_AND_ASSIGN(uint64_t h, HashImage(*copy, ""));
  EXPECT_EQ(h, snap_hash);
  // Sparse: only the data was written.
  EXPECT_TRUE(DiffReconstructs(*copy, "", "", writes, granularity()));
}

TEST_P(VolumeConformanceTest, CopyOfALargeSparseImageStaysSparse) {
  using namespace volume_test;
  const uint64_t size = 10 * kGiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> src, CreateAndOpen("bigsrc", size));
  const std::vector<Range> writes = {{kGiB, kMiB}, {9 * kGiB + 5 * kMiB, kMiB}};
  CAIRN_ASSERT_OK(WriteAt(*src, writes[0].offset, Pattern(140, writes[0].length)));
  CAIRN_ASSERT_OK(WriteAt(*src, writes[1].offset, Pattern(141, writes[1].length)));
  CAIRN_ASSERT_OK(src->CreateSnap("s1"));
  const std::string copy_name = NewName("bigcopy");
  const auto start = std::chrono::steady_clock::now();
  CAIRN_ASSERT_OK(pool().Copy(src->name(), "s1", copy_name, nullptr));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[          ] %s: Copy of a 10 GiB sparse image: %.3f s\n", GetParam().label.c_str(),
              seconds);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> copy, pool().Open(copy_name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> listed, CollectDiff(*copy, "", ""));
  EXPECT_LE(TotalLength(listed), RoundedOutBytes(writes, granularity(), size)) << Describe(listed);
  for (size_t i = 0; i < writes.size(); ++i) {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string got,
                               ReadAt(*copy, "", writes[i].offset, writes[i].length));
    EXPECT_TRUE(got == Pattern(140 + i, writes[i].length)) << "write " << i;
  }
}

TEST_P(VolumeConformanceTest, CloneAndCopyNeedASnapshot) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("nosnap", kMiB));
  CAIRN_EXPECT_CODE(pool().Clone(v->name(), "", NewName("c")), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(pool().Copy(v->name(), "", NewName("c"), nullptr), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(pool().Clone("no-such-image-" + v->name(), "s", NewName("c")), Code::kNotFound);
}

}  // namespace cairn
