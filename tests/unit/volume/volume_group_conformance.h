// The group snapshot part of the Volume conformance suite
// (volume_conformance.h): what Pool::CreateGroupSnap and friends promise,
// on every store. The target makes groups through
// VolumeTestTarget::make_group (the seam has no call for it).
//
// Usage: include this header after volume_conformance.h in the one .cc of a
// test binary that instantiates VolumeConformanceTest.
//
// Thread-safety: tests run on gtest's thread.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/volume/volume.h"
#include "tests/unit/volume/volume_conformance.h"
#include "tests/unit/volume/volume_test_util.h"

namespace cairn {
namespace volume_test {

// `v`'s snapshot named `name`, if it lists exactly one.
inline std::optional<SnapInfo> OnlySnapNamed(Volume& v, const std::string& name) {
  StatusOr<std::vector<SnapInfo>> snaps = v.ListSnaps();
  if (!snaps.ok()) return std::nullopt;
  std::optional<SnapInfo> found;
  for (const auto& s : *snaps) {
    if (s.name != name) continue;
    if (found) return std::nullopt;
    found = s;
  }
  return found;
}

}  // namespace volume_test

// --- group snapshots -----------------------------------------------------------

// Every member lists its share of the group snapshot, like a snapshot of
// its own (id, size, time), and reads the members' bytes of that instant.
TEST_P(VolumeConformanceTest, GroupSnapshotIsOneInstantOfEveryMember) {
  using namespace volume_test;
  ASSERT_TRUE(target().make_group) << "the target gives no way to make a group";
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> a, CreateAndOpen("member-a", 8 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> b, CreateAndOpen("member-b", 6 * kMiB));
  CAIRN_ASSERT_OK(WriteAt(*a, 0, Pattern(1, 64 * kKiB)));
  CAIRN_ASSERT_OK(WriteAt(*b, 4 * kMiB, Pattern(2, 64 * kKiB)));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("instant", {a->name(), b->name()}));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> images, pool().GroupImages(group));
  std::vector<std::string> expected{a->name(), b->name()};
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(images, expected);

  const int64_t before = NowNs();
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK(WriteAt(*a, 0, Pattern(3, 64 * kKiB)));
  CAIRN_ASSERT_OK(WriteAt(*b, 4 * kMiB, Pattern(4, 64 * kKiB)));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> snaps, pool().GroupSnaps(group));
  EXPECT_EQ(snaps, std::vector<std::string>{"g1"});

  const std::string share = GroupSnapName("g1");
  struct Expect {
    Volume* v;
    uint64_t size;
    uint64_t offset;
    uint64_t seed;
  };
  for (const Expect& e :
       {Expect{a.get(), 8 * kMiB, 0, 1}, Expect{b.get(), 6 * kMiB, 4 * kMiB, 2}}) {
    SCOPED_TRACE(e.v->name());
    std::optional<SnapInfo> s = OnlySnapNamed(*e.v, share);
    ASSERT_TRUE(s) << "no single share " << share;
    EXPECT_GT(s->id, 0u);
    EXPECT_EQ(s->size, e.size);
    EXPECT_GE(s->time_ns, before - 2'000'000'000);  // RBD's clock: the OSD's, in seconds
    EXPECT_LE(s->time_ns, NowNs() + 2'000'000'000);
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*e.v, share, e.offset, 64 * kKiB));
    EXPECT_TRUE(got == Pattern(e.seed, 64 * kKiB)) << "the share does not read the instant";
    CAIRN_EXPECT_OK(e.v->ConfirmSnap(share, s->id));
    CAIRN_ASSERT_OK_AND_ASSIGN(bool changed, e.v->ChangedSince(*s));
    EXPECT_TRUE(changed);
  }
}

// A diff runs from a user snapshot to a share (the next epoch of a volume
// that joined a group), and from the empty image; never from a share.
TEST_P(VolumeConformanceTest, DiffRunsFromAUserSnapshotToAGroupSnapshot) {
  using namespace volume_test;
  ASSERT_TRUE(target().make_group) << "the target gives no way to make a group";
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("diff-member", 12 * kMiB));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(10, 2 * kMiB)));
  CAIRN_ASSERT_OK(WriteAt(*v, 8 * kMiB, Pattern(11, kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  const std::vector<Range> changes{{kMiB + 4096, 8192}, {8 * kMiB, 4 * kMiB}};
  CAIRN_ASSERT_OK(WriteAt(*v, kMiB + 4096, Pattern(12, 8192)));
  CAIRN_ASSERT_OK(ZeroAt(*v, 8 * kMiB, 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("diff", {v->name()}));
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK(WriteAt(*v, 4 * kMiB, Pattern(13, kMiB)));  // after: not in the diff
  const std::string share = GroupSnapName("g1");

  std::vector<Extent> listed;
  EXPECT_TRUE(DiffReconstructs(*v, "s1", share, changes, granularity(), &listed));
  EXPECT_FALSE(Covers(listed, RecordKind::kData, 4 * kMiB, 1)) << Describe(listed);
  EXPECT_TRUE(DiffReconstructs(*v, "", share, {{0, 2 * kMiB}}, granularity()));
  CAIRN_EXPECT_CODE(CollectDiff(*v, share, "").status(), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(CollectDiff(*v, share, share).status(), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(CollectDiff(*v, "s1", GroupSnapName("no-such")).status(), Code::kNotFound);
}

// A share is made, removed and renamed with its group only; it is no clone's
// parent (librbd clones user snapshots), but it copies like any snapshot.
TEST_P(VolumeConformanceTest, AGroupSnapshotChangesOnlyWithItsGroup) {
  using namespace volume_test;
  ASSERT_TRUE(target().make_group) << "the target gives no way to make a group";
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("alone", 4 * kMiB));
  const std::string data = Pattern(20, 4 * kMiB);
  CAIRN_ASSERT_OK(WriteAt(*v, 0, data));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("alone", {v->name()}));
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  const std::string share = GroupSnapName("g1");

  CAIRN_EXPECT_CODE(v->CreateSnap(GroupSnapName("mine")), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(v->RemoveSnap(share), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(v->RenameSnap(share, "renamed"), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(v->RenameSnap("s1", GroupSnapName("s1")), Code::kInvalidArgument);
  CAIRN_EXPECT_CODE(pool().Clone(v->name(), share, NewName("clone")), Code::kInvalidArgument);
  EXPECT_TRUE(OnlySnapNamed(*v, share)) << "the share is gone";

  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(21, 4 * kMiB)));
  const std::string copy = NewName("copy");
  CAIRN_ASSERT_OK(pool().Copy(v->name(), share, copy, nullptr));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> c, pool().Open(copy));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*c, "", 0, data.size()));
  EXPECT_TRUE(got == data) << "the copy does not read as the share";
}

// RemoveGroupSnap takes the share off every member; readers are told by
// ConfirmSnap. Group snapshots list in creation order, a name reused too.
TEST_P(VolumeConformanceTest, RemovingAGroupSnapshotRemovesEveryShare) {
  using namespace volume_test;
  ASSERT_TRUE(target().make_group) << "the target gives no way to make a group";
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> a, CreateAndOpen("rm-a", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> b, CreateAndOpen("rm-b", 4 * kMiB));
  CAIRN_ASSERT_OK(WriteAt(*a, 0, Pattern(30, 4096)));
  CAIRN_ASSERT_OK(WriteAt(*b, 0, Pattern(31, 4096)));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("remove", {a->name(), b->name()}));
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK(WriteAt(*a, 0, Pattern(32, 4096)));
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> snaps, pool().GroupSnaps(group));
  EXPECT_EQ(snaps, (std::vector<std::string>{"g1", "g2"}));
  std::optional<SnapInfo> g1 = OnlySnapNamed(*a, GroupSnapName("g1"));
  ASSERT_TRUE(g1);

  CAIRN_ASSERT_OK(pool().RemoveGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(snaps, pool().GroupSnaps(group));
  EXPECT_EQ(snaps, std::vector<std::string>{"g2"});
  for (Volume* v : {a.get(), b.get()}) {
    SCOPED_TRACE(v->name());
    EXPECT_FALSE(OnlySnapNamed(*v, GroupSnapName("g1")));
    EXPECT_TRUE(OnlySnapNamed(*v, GroupSnapName("g2")));
  }
  CAIRN_EXPECT_CODE(a->ConfirmSnap(GroupSnapName("g1"), g1->id), Code::kNotFound);
  CAIRN_EXPECT_CODE(a->OpenIo(GroupSnapName("g1")).status(), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool().RemoveGroupSnap(group, "g1"), Code::kNotFound);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, ReadAt(*a, GroupSnapName("g2"), 0, 4096));
  EXPECT_TRUE(got == Pattern(32, 4096));

  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(snaps, pool().GroupSnaps(group));
  EXPECT_EQ(snaps, (std::vector<std::string>{"g2", "g1"}));
}

TEST_P(VolumeConformanceTest, GroupCallsSayWhatIsWrong) {
  using namespace volume_test;
  ASSERT_TRUE(target().make_group) << "the target gives no way to make a group";
  const std::string missing = target().name_prefix + "no-such-group";
  CAIRN_EXPECT_CODE(pool().GroupImages(missing).status(), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool().GroupSnaps(missing).status(), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool().CreateGroupSnap(missing, "g1"), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool().RemoveGroupSnap(missing, "g1"), Code::kNotFound);

  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, CreateAndOpen("errors", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("errors", {v->name()}));
  CAIRN_EXPECT_CODE(pool().CreateGroupSnap(group, ""), Code::kInvalidArgument);
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  CAIRN_EXPECT_CODE(pool().CreateGroupSnap(group, "g1"), Code::kAlreadyExists);
  CAIRN_EXPECT_CODE(pool().RemoveGroupSnap(group, "no-such-snap"), Code::kNotFound);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> snaps, pool().GroupSnaps(group));
  EXPECT_EQ(snaps, std::vector<std::string>{"g1"});

  // A group with no image: its snapshots have no share, but exist.
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string empty, NewGroup("empty", {}));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> images, pool().GroupImages(empty));
  EXPECT_TRUE(images.empty());
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(empty, "g1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(snaps, pool().GroupSnaps(empty));
  EXPECT_EQ(snaps, std::vector<std::string>{"g1"});
  CAIRN_ASSERT_OK(pool().RemoveGroupSnap(empty, "g1"));
}

// JoinGroup makes the group the first time; the last image to leave
// takes it and its snapshots away (a failed-over group's images at the
// standby site, once failed back).
TEST_P(VolumeConformanceTest, JoiningMakesAGroupAndTheLastToLeaveRemovesIt) {
  using namespace volume_test;
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> a, CreateAndOpen("join-a", 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> b, CreateAndOpen("join-b", 4 * kMiB));
  const std::string group = target().name_prefix + "joined";
  CAIRN_EXPECT_CODE(pool().GroupImages(group).status(), Code::kNotFound);
  CAIRN_EXPECT_CODE(pool().JoinGroup(group, target().name_prefix + "no-such-image"),
                    Code::kNotFound);
  // (A group made for an image that could not join does not outlive it.)
  CAIRN_EXPECT_CODE(pool().GroupImages(group).status(), Code::kNotFound);
  CAIRN_ASSERT_OK(pool().JoinGroup(group, a->name()));
  CAIRN_EXPECT_CODE(pool().JoinGroup(group, a->name()), Code::kAlreadyExists);
  CAIRN_ASSERT_OK(pool().JoinGroup(group, b->name()));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> images, pool().GroupImages(group));
  std::vector<std::string> both{a->name(), b->name()};
  std::sort(both.begin(), both.end());
  EXPECT_EQ(images, both);
  CAIRN_ASSERT_OK(pool().CreateGroupSnap(group, "g1"));
  ASSERT_TRUE(OnlySnapNamed(*a, GroupSnapName("g1")));

  CAIRN_ASSERT_OK(pool().LeaveGroup(group, a->name()));
  CAIRN_EXPECT_CODE(pool().LeaveGroup(group, a->name()), Code::kNotFound);
  CAIRN_ASSERT_OK_AND_ASSIGN(images, pool().GroupImages(group));
  EXPECT_EQ(images, std::vector<std::string>{b->name()});
  CAIRN_ASSERT_OK(pool().LeaveGroup(group, b->name()));
  CAIRN_EXPECT_CODE(pool().GroupImages(group).status(), Code::kNotFound);
  EXPECT_FALSE(OnlySnapNamed(*a, GroupSnapName("g1"))) << "a share outlived its group";
  EXPECT_FALSE(OnlySnapNamed(*b, GroupSnapName("g1"))) << "a share outlived its group";
}

}  // namespace cairn
