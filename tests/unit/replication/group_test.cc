// Consistency groups over the in-memory store: a group point holds every
// member at one instant (the group snapshot), under concurrent dependent
// writes to all members; it exists only whole; members join without a
// resync of the others; a store group that disagrees with the members
// takes no instant.
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <set>

#include "engine/replication/group_source.h"
#include "engine/replication/retention.h"
#include "tests/unit/replication/replication_fixture.h"

namespace cairn {
namespace {

constexpr uint64_t kSize = 4 * kMiB;

// Site A's pool, with `hook` run around each group snapshot: hook(true)
// before it is taken, hook(false) after.
class AroundGroupSnaps final : public Pool {
 public:
  AroundGroupSnaps(std::shared_ptr<MemoryPool> inner, std::function<void(bool before)> hook)
      : inner_(std::move(inner)), hook_(std::move(hook)) {}
  const std::string& name() const override { return inner_->name(); }
  StatusOr<std::unique_ptr<Volume>> Open(const std::string& image) override {
    return inner_->Open(image);
  }
  Status Create(const std::string& image, uint64_t size) override {
    return inner_->Create(image, size);
  }
  Status Remove(const std::string& image) override { return inner_->Remove(image); }
  StatusOr<bool> Exists(const std::string& image) override { return inner_->Exists(image); }
  Status Rename(const std::string& from, const std::string& to) override {
    return inner_->Rename(from, to);
  }
  Status Clone(const std::string& image, const std::string& snap,
               const std::string& dest) override {
    return inner_->Clone(image, snap, dest);
  }
  Status Copy(const std::string& image, const std::string& snap, const std::string& dest,
              const ProgressFn& progress) override {
    return inner_->Copy(image, snap, dest, progress);
  }
  StatusOr<std::vector<std::string>> GroupImages(const std::string& group) override {
    return inner_->GroupImages(group);
  }
  Status CreateGroupSnap(const std::string& group, const std::string& snap) override {
    hook_(true);
    Status st = inner_->CreateGroupSnap(group, snap);
    hook_(false);
    return st;
  }
  Status RemoveGroupSnap(const std::string& group, const std::string& snap) override {
    return inner_->RemoveGroupSnap(group, snap);
  }
  StatusOr<std::vector<std::string>> GroupSnaps(const std::string& group) override {
    return inner_->GroupSnaps(group);
  }
  Status JoinGroup(const std::string& group, const std::string& image) override {
    return inner_->JoinGroup(group, image);
  }
  Status LeaveGroup(const std::string& group, const std::string& image) override {
    return inner_->LeaveGroup(group, image);
  }

 private:
  std::shared_ptr<MemoryPool> inner_;
  std::function<void(bool before)> hook_;
};

class GroupTest : public ReplicationTest {
 protected:
  void SetUp() override {
    ReplicationTest::SetUp();
    // spdlog's registry is made on first use; libspdlog is not built for
    // TSan, which then sees the members' first log lines race on it.
    spdlog::default_logger();
  }
  void TearDown() override {
    if (group_) group_->Stop();
    for (auto& m : members_) m->Stop();
    // Gone, with their links: the sink's sessions end.
    group_.reset();
    members_.clear();
    {
      std::lock_guard lock(links_mu_);
      for (auto& t : links_) t.join();
    }
    ReplicationTest::TearDown();
  }

  void MakeImages(const std::vector<std::string>& images) {
    ASSERT_TRUE(site_a_->CreateGroup("app").ok());
    for (const auto& image : images) {
      ASSERT_TRUE(site_a_->Create(image, kSize).ok());
      ASSERT_TRUE(site_a_->AddToGroup("app", image).ok());
    }
  }

  // The fixture's Connector shares its fault state between links; members
  // connect at once, each on its own thread.
  SourceReplicator::Connector Links() {
    return [this]() -> StatusOr<std::unique_ptr<Link>> {
      auto [a, b] = MakeMemoryLinkPair(16u << 20);
      std::lock_guard lock(links_mu_);
      links_.emplace_back([this, l = std::move(b)]() mutable {
        [[maybe_unused]] const Status ended = sink_->Serve(*l);
      });
      return std::move(a);
    };
  }

  VolumeConfig Member(const std::string& image) {
    VolumeConfig c = Config();
    c.id = "vol-" + image;
    c.image = image;
    c.target_image = image + "-standby";
    c.interval = std::chrono::milliseconds(0);
    c.group = "app";
    c.retention = member_rules_;
    return c;
  }
  std::optional<RetentionRules> member_rules_;  // Member()'s own rules

  void StartGroup(const std::vector<std::string>& images, std::shared_ptr<Pool> pool = nullptr) {
    if (!pool) pool = site_a_;
    for (const auto& image : images) {
      members_.push_back(std::make_shared<SourceReplicator>(Member(image), "a", pool, Links()));
    }
    group_ = std::make_unique<GroupSource>("app", pool, std::chrono::milliseconds(0), members_);
    for (auto& m : members_) m->Start();
    group_->Start();
  }

  void StopGroup() {
    group_->Stop();
    for (auto& m : members_) m->Stop();
    group_.reset();
    members_.clear();
  }

  // Asks for an instant and waits until the sink has the group point.
  GroupPoint Instant() {
    auto seq = group_->RequestNow();
    EXPECT_TRUE(seq.ok()) << seq.status().ToString();
    // Longer than PollUntil's: 200 members under TSan take a while.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < deadline) {
      auto points = sink_->GroupPoints("app");
      if (points.ok() && !points->empty() && points->back().seq >= *seq) return points->back();
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ADD_FAILURE() << "no group point " << *seq << " within 120 s";
    return GroupPoint{};
  }

  // The 8 bytes at offset 0 of image@snap at site B, as a number.
  uint64_t CounterAtB(const std::string& image, const std::string& snap) {
    auto vol = testing::MustOpen(*site_b_, image);
    auto io = vol->OpenIo(snap);
    EXPECT_TRUE(io.ok()) << io.status().ToString();
    char buf[8] = {};
    EXPECT_TRUE((*io)->StartRead(0, 0, std::span<char>(buf, 8)).ok());
    EXPECT_TRUE((*io)->WaitOne().status.ok());
    uint64_t v = 0;
    std::memcpy(&v, buf, 8);
    return v;
  }

  std::vector<std::shared_ptr<SourceReplicator>> members_;
  std::unique_ptr<GroupSource> group_;
  std::mutex links_mu_;
  std::vector<std::thread> links_;
};

TEST_F(GroupTest, GroupPointsHoldEveryMemberAtOneInstantUnderDependentWrites) {
  const std::vector<std::string> images = {"d0", "d1", "d2"};
  MakeImages(images);
  StartGroup(images);
  // Dependent writes, each begun once the one before completed: write k
  // goes to member k % 3. At any one instant the members hold the last
  // three writes: three consecutive numbers. Snapshots taken one member
  // after the other would not.
  const auto write = [](Volume& vol, uint64_t k) {
    std::string bytes(8, '\0');
    std::memcpy(bytes.data(), &k, 8);
    testing::Write(vol, 0, bytes);
  };
  for (uint64_t k = 0; k < 3; ++k) write(*testing::MustOpen(*site_a_, images[k]), k);
  std::atomic<bool> stop = false;
  std::thread writer([&] {
    std::vector<std::unique_ptr<Volume>> vols;
    for (const auto& image : images) vols.push_back(testing::MustOpen(*site_a_, image));
    for (uint64_t k = 3; !stop; ++k) write(*vols[k % 3], k);
  });
  std::vector<GroupPoint> made;
  for (int i = 0; i < 4; ++i) made.push_back(Instant());
  stop = true;
  writer.join();
  for (const auto& g : made) {
    ASSERT_EQ(g.volumes, (std::vector<std::string>{"vol-d0", "vol-d1", "vol-d2"}));
    std::vector<uint64_t> counters;
    for (const auto& image : images) {
      counters.push_back(CounterAtB(image + "-standby", SnapName(g.seq)));
      // The point is the group snapshot, byte for byte.
      auto a = testing::MustOpen(*site_a_, image);
      auto b = testing::MustOpen(*site_b_, image + "-standby");
      EXPECT_EQ(testing::ImageHash(*b, SnapName(g.seq), kSize),
                testing::ImageHash(*a, GroupSnapName(SnapName(g.seq)), kSize))
          << image << " at group point " << g.seq;
    }
    std::sort(counters.begin(), counters.end());
    EXPECT_EQ(counters[1], counters[0] + 1) << "group point " << g.seq << " is no one instant";
    EXPECT_EQ(counters[2], counters[1] + 1) << "group point " << g.seq << " is no one instant";
  }
}

TEST_F(GroupTest, APointIsReadFromTheGroupSnapshotNotTheMembersOwnSnapshot) {
  const std::vector<std::string> images = {"d0", "d1"};
  MakeImages(images);
  // A write to every member between the members' own snapshots and the
  // group snapshot: what a guest writes while an instant is taken.
  int instant = 0;
  StartGroup(images, std::make_shared<AroundGroupSnaps>(site_a_, [&](bool before) {
               if (!before) return;
               ++instant;
               for (const auto& image : images) {
                 auto vol = testing::MustOpen(*site_a_, image);
                 testing::Write(*vol, 1 * kMiB,
                                fmt::format("written as instant {} was taken", instant));
               }
             }));
  const GroupPoint first = Instant();
  const GroupPoint second = Instant();
  EXPECT_GT(second.seq, first.seq);
  for (const auto& g : {first, second}) {
    for (const auto& image : images) {
      auto a = testing::MustOpen(*site_a_, image);
      auto b = testing::MustOpen(*site_b_, image + "-standby");
      const std::string point = testing::ImageHash(*b, SnapName(g.seq), kSize);
      EXPECT_EQ(point, testing::ImageHash(*a, GroupSnapName(SnapName(g.seq)), kSize));
      // The member's own cairn.<seq> (the next diff's base) was taken
      // before the write the instant holds.
      EXPECT_NE(point, testing::ImageHash(*a, SnapName(g.seq), kSize));
    }
  }
  // The second instant was a diff from the first (the write between the
  // member's snapshot and the group snapshot of the first was sent again).
  auto p = sink_->Points("vol-d0");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->back().epoch.base_seq, first.seq);
}

TEST_F(GroupTest, AGroupPointExistsOnlyOnceEveryMemberHasItsPoint) {
  Catalog catalog(*catalog_);
  RestorePoint p;
  p.epoch.volume = "vol-d0";
  p.epoch.seq = 7;
  p.epoch.group = "app";
  p.epoch.group_members = 2;
  p.pool = "rbd";
  p.image = "d0-standby";
  p.snap = SnapName(7);
  ASSERT_TRUE(catalog.AddPoint(p).ok());
  auto none = catalog.GroupPoints("app");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty()) << "one member of two made a group point";
  p.epoch.volume = "vol-d1";
  p.image = "d1-standby";
  ASSERT_TRUE(catalog.AddPoint(p).ok());
  auto whole = catalog.GroupPoints("app");
  ASSERT_TRUE(whole.ok());
  ASSERT_EQ(whole->size(), 1u);
  EXPECT_EQ(whole->front().volumes, (std::vector<std::string>{"vol-d0", "vol-d1"}));
  // A same-named group of another source site (a second primary writing
  // into this pool) never completes this one's instant.
  p.epoch.seq = 8;
  p.epoch.volume = "vol-d0";
  ASSERT_TRUE(catalog.AddPoint(p).ok());
  p.epoch.volume = "vol-x1";
  p.epoch.source_site = "c";
  ASSERT_TRUE(catalog.AddPoint(p).ok());
  auto mixed = catalog.GroupPoints("app");
  ASSERT_TRUE(mixed.ok());
  EXPECT_EQ(mixed->size(), 1u) << "two sites' members made one group point";
  // A member's point gone (retention, a lost snapshot): no group point.
  ASSERT_TRUE(catalog.RemovePoint("vol-d1", 7).ok());
  auto gone = catalog.GroupPoints("app");
  ASSERT_TRUE(gone.ok());
  EXPECT_TRUE(gone->empty());
  EXPECT_EQ(catalog.GetGroupPoint("app", 7).status().code(), Code::kNotFound);
}

TEST_F(GroupTest, AMemberJoinsWithoutAResyncOfTheOthers) {
  MakeImages({"d0", "d1"});
  StartGroup({"d0", "d1"});
  const GroupPoint before = Instant();
  StopGroup();
  ASSERT_TRUE(site_a_->Create("d2", kSize).ok());
  std::mt19937_64 rng(7);
  testing::RandomChanges(*testing::MustOpen(*site_a_, "d2"), rng, kSize, 20);
  ASSERT_TRUE(site_a_->AddToGroup("app", "d2").ok());
  StartGroup({"d0", "d1", "d2"});
  const GroupPoint after = Instant();
  EXPECT_EQ(after.volumes, (std::vector<std::string>{"vol-d0", "vol-d1", "vol-d2"}));
  auto d0 = sink_->Points("vol-d0");
  ASSERT_TRUE(d0.ok());
  EXPECT_EQ(d0->back().epoch.base_seq, before.seq) << "an old member was resynced";
  auto d2 = sink_->Points("vol-d2");
  ASSERT_TRUE(d2.ok());
  EXPECT_EQ(d2->back().epoch.base_seq, 0u) << "the new member's first epoch is a full one";
  auto a = testing::MustOpen(*site_a_, "d2");
  auto b = testing::MustOpen(*site_b_, "d2-standby");
  EXPECT_EQ(testing::ImageHash(*b, SnapName(after.seq), kSize),
            testing::ImageHash(*a, GroupSnapName(SnapName(after.seq)), kSize));
}

TEST_F(GroupTest, AStoreGroupThatDisagreesWithTheMembersTakesNoInstant) {
  MakeImages({"d0", "d1"});
  ASSERT_TRUE(site_a_->Create("stray", kSize).ok());
  ASSERT_TRUE(site_a_->AddToGroup("app", "stray").ok());
  std::vector<std::shared_ptr<SourceReplicator>> members;
  for (const auto& image : {"d0", "d1"}) {
    members.push_back(std::make_shared<SourceReplicator>(Member(image), "a", site_a_, Links()));
  }
  GroupSource group("app", site_a_, std::chrono::milliseconds(0), members);
  auto taken = group.TakeInstant();
  ASSERT_EQ(taken.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(taken.status().message().find("stray"), std::string_view::npos)
      << taken.status().ToString();
  for (const auto& image : {"d0", "d1", "stray"}) {
    auto snaps = testing::MustOpen(*site_a_, image)->ListSnaps();
    ASSERT_TRUE(snaps.ok());
    EXPECT_TRUE(snaps->empty()) << image << " got a snapshot of an instant never taken";
  }
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

TEST_F(GroupTest, TwoHundredMembersMakeOneGroupPointPerInstant) {
  std::vector<std::string> images;
  for (int i = 0; i < 200; ++i) images.push_back(fmt::format("m{:03}", i));
  ASSERT_TRUE(site_a_->CreateGroup("app").ok());
  for (const auto& image : images) {
    ASSERT_TRUE(site_a_->Create(image, 64 * 1024).ok());
    ASSERT_TRUE(site_a_->AddToGroup("app", image).ok());
    testing::Write(*testing::MustOpen(*site_a_, image), 0, "first " + image);
  }
  StartGroup(images);
  const GroupPoint first = Instant();
  for (const auto& image : images) {
    testing::Write(*testing::MustOpen(*site_a_, image), 4096, "second " + image);
  }
  const GroupPoint second = Instant();
  ASSERT_EQ(second.volumes.size(), 200u);
  auto points = sink_->GroupPoints("app");
  ASSERT_TRUE(points.ok());
  EXPECT_EQ(points->size(), 2u);
  for (const auto& image : {images.front(), images.back()}) {
    auto a = testing::MustOpen(*site_a_, image);
    auto b = testing::MustOpen(*site_b_, image + "-standby");
    for (const auto& g : {first, second}) {
      EXPECT_EQ(testing::ImageHash(*b, SnapName(g.seq), 64 * 1024),
                testing::ImageHash(*a, GroupSnapName(SnapName(g.seq)), 64 * 1024))
          << image << " at group point " << g.seq;
    }
  }
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

TEST_F(GroupTest, MembersKeepTheSameInstantsWhenTheirSnapshotTimesStraddleAnHour) {
  // Site A on clock_; while shares_from_ns is set, a group snapshot's
  // shares are stamped 1 ms apart from it (librbd stamps each image's).
  struct Stamps {
    std::atomic<bool> in_group_snap{false};
    std::atomic<int64_t> shares_from_ns{0};
    std::atomic<int64_t> share{0};
  };
  auto stamps = std::make_shared<Stamps>();  // outlives the test's body with site A
  MemoryPoolOptions o;
  o.now_ns = [this, stamps] {
    if (!stamps->in_group_snap || stamps->shares_from_ns == 0) return clock_.UnixNs();
    return stamps->shares_from_ns + 1'000'000 * stamps->share++;
  };
  site_a_ = std::make_shared<MemoryPool>("rbd", o);
  sink_env_.clock = &clock_;
  sink_env_.keep_points = 1;
  sink_env_.retention_tiers = *ParseRetentionTiers("1h*3");
  RestartSink(sink_env_);
  const std::vector<std::string> images = {"m1", "m2"};
  MakeImages(images);
  StartGroup(images, std::make_shared<AroundGroupSnaps>(
                         site_a_, [stamps](bool before) { stamps->in_group_snap = before; }));
  constexpr int64_t kHour = 3'600'000'000'000;
  const int64_t h1 = clock_.UnixNs() - clock_.UnixNs() % kHour + kHour;
  // Instant 1 at 0:30; instant 2 at 1:00, m1's share 1 ms before the hour
  // and m2's on it; 3 at 1:30; 4 at 2:30.
  clock_.Advance(std::chrono::nanoseconds(h1 - kHour / 2 - clock_.UnixNs()));
  EXPECT_EQ(Instant().seq, 1u);
  stamps->shares_from_ns = h1 - 1'000'000;
  EXPECT_EQ(Instant().seq, 2u);
  stamps->shares_from_ns = 0;
  clock_.Advance(std::chrono::hours(1));
  EXPECT_EQ(Instant().seq, 3u);
  clock_.Advance(std::chrono::hours(1));
  EXPECT_EQ(Instant().seq, 4u);
  // By its own times m1 would keep 2 for hour 0 and m2 would keep 1, and
  // the group would have no point of hour 0. At the group points' times
  // (the later share): hour 0 -> 1, hour 1 -> 3, hour 2 -> 4.
  const std::vector<uint64_t> kept = {1, 3, 4};
  PollUntil("both members keeping the instants 1, 3, 4", [&] {
    for (const auto& image : images) {
      std::vector<uint64_t> seqs;
      const std::vector<RestorePoint> points = sink_->Points("vol-" + image).value();
      for (const auto& p : points) seqs.push_back(p.epoch.seq);
      if (seqs != kept) return false;
    }
    return true;
  });
  std::vector<uint64_t> group_seqs;
  const std::vector<GroupPoint> group_points = sink_->GroupPoints("app").value();
  for (const auto& g : group_points) group_seqs.push_back(g.seq);
  EXPECT_EQ(group_seqs, kept);
}

// The members' own rules (in their Hello) add to the sink's (the newest
// only, here): of 4 instants both keep the two newest whole ones. (A member
// that made its point of instant 4 before the other did keeps instant 2
// too, until its next pass: 4 was not whole yet.)
TEST_F(GroupTest, MembersKeepTheInstantsOfTheirOwnRules) {
  sink_env_.keep_points = 1;
  RestartSink(sink_env_);
  member_rules_ = RetentionRules{2, {}};
  const std::vector<std::string> images = {"r1", "r2"};
  MakeImages(images);
  StartGroup(images);
  for (uint64_t i = 1; i <= 4; ++i) EXPECT_EQ(Instant().seq, i);
  const auto seqs = [&](const std::string& image) {
    std::set<uint64_t> out;
    const std::vector<RestorePoint> points = sink_->Points("vol-" + image).value();
    for (const auto& p : points) out.insert(p.epoch.seq);
    return out;
  };
  const std::set<uint64_t> kept = {3, 4}, lagging = {2, 3, 4};
  PollUntil("each member keeping instants 3 and 4 (and 2 at most besides)", [&] {
    int exact = 0;
    for (const auto& image : images) {
      const auto s = seqs(image);
      if (s != kept && s != lagging) return false;
      exact += s == kept;
    }
    return exact >= 1;  // the last member to make its point of 4 pruned by 4
  });
  std::vector<uint64_t> group_seqs;
  const std::vector<GroupPoint> group_points = sink_->GroupPoints("app").value();
  for (const auto& g : group_points) group_seqs.push_back(g.seq);
  const std::vector<uint64_t> whole = {3, 4}, whole_lagging = {2, 3, 4};
  EXPECT_TRUE(group_seqs == whole || group_seqs == whole_lagging)
      << fmt::format("{}", fmt::join(group_seqs, ","));
}

TEST_F(GroupTest, AnIdleGroupsLagStaysLowAtBothSites) {
  UseManualClock();
  const std::vector<std::string> images = {"i1", "i2"};
  MakeImages(images);
  for (const auto& image : images) {
    members_.push_back(std::make_shared<SourceReplicator>(Member(image), "a", site_a_, Links()));
    members_.back()->set_clock(clock_);
  }
  const auto interval = std::chrono::seconds(10);
  group_ = std::make_unique<GroupSource>("app", site_a_, interval, members_);
  group_->set_clock(clock_);
  for (auto& m : members_) m->Start();
  group_->Start();
  PollUntil("the first group point", [&] { return group_->Report().last_seq == 1; });
  // An hour without a write: the group takes no instant, and its lag and
  // its members' (at both sites) count from the last check, not the point.
  clock_.Advance(std::chrono::hours(1));
  PollUntil("the group finding its members unchanged",
            [&] { return group_->Report().unchanged_at_ns == clock_.UnixNs(); });
  PollUntil("the sink told that both members are unchanged", [&] {
    const auto st = sink_->Report();
    return st.size() == 2 && std::all_of(st.begin(), st.end(), [&](const VolumeStatusInfo& v) {
             return v.unchanged_as_of_ns == clock_.UnixNs();
           });
  });
  for (const auto& v : sink_->Report()) {
    EXPECT_EQ(v.last_seq, 1u) << v.volume;
    EXPECT_EQ(v.lag_seconds, 0.0) << v.volume;
  }
  for (const auto& m : members_) EXPECT_EQ(m->Report().lag_seconds, 0.0) << m->config().id;
  EXPECT_EQ(group_->Report().instant_seq, 1u) << "an instant taken of idle members";
  // A write: the next check takes an instant.
  testing::Write(*testing::MustOpen(*site_a_, "i2"), 0, "a write");
  clock_.Advance(interval);
  PollUntil("group point 2 after the write", [&] { return group_->Report().last_seq == 2; });
}

TEST_F(GroupTest, AMemberThatOutlivesItsGroupIsToldSoNotLeftDangling) {
  const std::vector<std::string> images = {"o1", "o2"};
  MakeImages(images);
  StartGroup(images);
  EXPECT_EQ(Instant().seq, 1u);
  group_->Stop();
  group_.reset();  // its members still run (held elsewhere: a call in flight)
  const auto asked = members_[0]->RequestNow();
  EXPECT_EQ(asked.status().code(), Code::kAborted) << asked.status().ToString();
  EXPECT_NE(asked.status().message().find("group app is stopped"), std::string::npos)
      << asked.status().ToString();
}

TEST_F(GroupTest, RestoreDrillAndFailoverActOnEveryMemberOrNone) {
  const std::vector<std::string> images = {"d0", "d1"};
  MakeImages(images);
  for (const auto& image : images) {
    testing::Write(*testing::MustOpen(*site_a_, image), 8192, "data of " + image);
  }
  StartGroup(images);
  const GroupPoint g = Instant();

  // d1's restored image cannot be made: d0's, made first, goes again.
  ASSERT_TRUE(site_b_->Create("d1-standby-r", kSize).ok());
  auto restored = sink_->RestoreGroup("app", g.seq, "r", false, false);
  EXPECT_EQ(restored.status().code(), Code::kAlreadyExists) << restored.status().ToString();
  auto left = site_b_->Exists("d0-standby-r");
  ASSERT_TRUE(left.ok());
  EXPECT_FALSE(*left) << "a group restored in part was left behind";

  auto drills = sink_->DrillGroup("app", 0);
  ASSERT_TRUE(drills.ok()) << drills.status().ToString();
  ASSERT_EQ(drills->size(), 2u);
  for (const auto& d : *drills) EXPECT_EQ(d.point.epoch.seq, g.seq);
  auto held = sink_->Points("vol-d1");
  ASSERT_TRUE(held.ok());
  EXPECT_EQ(held->back().held_by.size(), 1u);
  auto stopped = sink_->StopGroupDrills("app");
  ASSERT_TRUE(stopped.ok()) << stopped.status().ToString();
  EXPECT_EQ(stopped->size(), 2u);

  auto promoted = sink_->PromoteGroup("app", 0, "");
  ASSERT_TRUE(promoted.ok()) << promoted.status().ToString();
  ASSERT_EQ(promoted->size(), 2u);
  for (const auto& image : images) {
    auto a = testing::MustOpen(*site_a_, image);
    auto b = testing::MustOpen(*site_b_, image + "-standby-failover");
    EXPECT_EQ(testing::ImageHash(*b, "", kSize),
              testing::ImageHash(*a, GroupSnapName(SnapName(g.seq)), kSize))
        << image << " promoted";
  }
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

TEST_F(GroupTest, AFailedGroupSnapshotLeavesNoPointAndTheNextInstantShipsWhole) {
  const std::vector<std::string> images = {"d0", "d1"};
  MakeImages(images);
  auto faulty = std::make_shared<FaultPool>(*site_a_);
  std::atomic<int> refused = 0;
  faulty->SetFault([&](const VolumeFaultPoint& p) {
    if (p.op == VolumeOp::kCreateGroupSnap && refused++ == 0) {
      return Unavailable("injected: the group snapshot failed");
    }
    return OkStatus();
  });
  StartGroup(images, faulty);
  // The first instant fails after every member's own snapshot was taken;
  // they are removed again and no member ships them.
  const GroupPoint g = Instant();
  EXPECT_GE(refused.load(), 2);
  auto points = sink_->GroupPoints("app");
  ASSERT_TRUE(points.ok());
  ASSERT_EQ(points->size(), 1u) << "the failed instant made a point";
  for (const auto& image : images) {
    auto ps = sink_->Points("vol-" + image);
    ASSERT_TRUE(ps.ok());
    ASSERT_EQ(ps->size(), 1u);
    EXPECT_EQ(ps->front().epoch.seq, g.seq);
    auto a = testing::MustOpen(*site_a_, image);
    auto b = testing::MustOpen(*site_b_, image + "-standby");
    EXPECT_EQ(testing::ImageHash(*b, SnapName(g.seq), kSize),
              testing::ImageHash(*a, GroupSnapName(SnapName(g.seq)), kSize));
    auto snaps = a->ListSnaps();
    ASSERT_TRUE(snaps.ok());
    for (const auto& s : *snaps) {
      EXPECT_TRUE(s.name == SnapName(g.seq) || s.name == GroupSnapName(SnapName(g.seq)))
          << image << " keeps " << s.name << " of the failed instant";
    }
  }
}

}  // namespace
}  // namespace cairn
