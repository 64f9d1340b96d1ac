// Replication in reverse after a failover, over the in-process link and
// in-memory volumes: site B's promoted image replicates back into site A's
// original image as a delta from the point both share, and what A wrote
// after that point is kept as snapshots, never lost.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <random>
#include <thread>

#include "engine/link/link.h"
#include "engine/replication/group_source.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/file_spool_store.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kSize = 4 * kMiB;

// One site: its pool, its catalog, and a sink serving them.
struct Site {
  Site(const std::string& name, const std::filesystem::path& spool)
      : pool(std::make_shared<MemoryPool>("rbd")), catalog(std::make_shared<MemoryKvStore>()) {
    SinkEnv env;
    env.site = name;
    env.spools = std::make_shared<FileSpoolStore>(spool);
    env.pools = {"rbd"};
    env.open_pool = [p = pool](const std::string&) -> StatusOr<std::shared_ptr<Pool>> {
      return std::shared_ptr<Pool>(p);
    };
    env.open_catalog = [c = catalog](const std::string&) -> StatusOr<std::shared_ptr<KvStore>> {
      return std::shared_ptr<KvStore>(c);
    };
    env.gate = gate;
    sink = std::make_unique<Sink>(env);
  }
  std::shared_ptr<ImageGate> gate = std::make_shared<ImageGate>();
  std::shared_ptr<MemoryPool> pool;
  std::shared_ptr<MemoryKvStore> catalog;
  std::unique_ptr<Sink> sink;
};

class FailbackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("cairn-failback-" + std::to_string(getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    a_ = std::make_unique<Site>("a", dir_ / "a");
    b_ = std::make_unique<Site>("b", dir_ / "b");
  }
  void TearDown() override {
    for (auto& t : sessions_) t.join();
    std::filesystem::remove_all(dir_);
  }

  // Each connect serves the other end with `to`'s sink on a thread.
  SourceReplicator::Connector ConnectTo(Site& to) {
    return [this, &to]() -> StatusOr<std::unique_ptr<Link>> {
      auto [src, dst] = MakeMemoryLinkPair(16u << 20);
      sessions_.emplace_back([&to, l = std::move(dst)]() mutable {
        [[maybe_unused]] const Status ended = to.sink->Serve(*l);
      });
      return std::move(src);
    };
  }

  static VolumeConfig Config(const std::string& image, const std::string& target) {
    VolumeConfig c;
    c.id = "vol1";
    c.pool = "rbd";
    c.image = image;
    c.target_pool = "rbd";
    c.target_image = target;
    c.keep_snapshots = 100;
    c.block_size = 64 * 1024;
    return c;
  }

  // Site A replicates points 1 and 2 to B, then B fails over to point 2
  // in "img-p", and each site writes. Returns A's head hash before the
  // failback.
  std::string FailOverWithWritesOnBothSides(bool a_writes) {
    EXPECT_TRUE(a_->pool->Create("img", kSize).ok());
    auto img = testing::MustOpen(*a_->pool, "img");
    SourceReplicator forward(Config("img", "img-standby"), "a", a_->pool, ConnectTo(*b_));
    for (int i = 0; i < 2; ++i) {
      testing::RandomChanges(*img, rng_, kSize, 8);
      auto sum = forward.RunOnce();
      EXPECT_TRUE(sum.ok()) << sum.status().ToString();
    }
    forward.Disconnect();
    if (a_writes) {  // the tail that never reached B, and a snapshot of it
      testing::Write(*img, kMiB, testing::RandomBytes(rng_, 3 * 65536));
      EXPECT_TRUE(img->CreateSnap("cairn.3").ok());
      testing::Write(*img, 2 * kMiB, testing::RandomBytes(rng_, 65536));
    }
    auto promoted = b_->sink->Promote("vol1", 0, "", "img-p");
    EXPECT_TRUE(promoted.ok()) << promoted.status().ToString();
    return testing::ImageHash(*img, "", kSize);
  }

  // B's source for the promoted image, as cairnd makes it: its base point
  // is the one it was promoted from.
  // Site A's image "img", the one member of its RBD group "app", and its
  // replicator to B.
  std::shared_ptr<SourceReplicator> GroupMemberAtA() {
    EXPECT_TRUE(a_->pool->Create("img", kSize).ok());
    EXPECT_TRUE(a_->pool->CreateGroup("app").ok());
    EXPECT_TRUE(a_->pool->AddToGroup("app", "img").ok());
    VolumeConfig c = Config("img", "img-standby");
    c.group = "app";
    return std::make_shared<SourceReplicator>(c, "a", a_->pool, ConnectTo(*b_));
  }

  // As cairnd's: A's source stands by while A's sink owns its image.
  SourceReplicator::StandDownFn StandDownAtA() {
    return [this]() -> StatusOr<std::string> {
      ASSIGN_OR_RETURN(std::string owner, Catalog(*a_->catalog).ImageOwner("rbd", "img"));
      return owner.empty() ? std::string() : "the standby of " + owner;
    };
  }

  std::unique_ptr<SourceReplicator> Reverse() {
    auto rep =
        std::make_unique<SourceReplicator>(Config("img-p", "img"), "b", b_->pool, ConnectTo(*a_));
    rep->set_base_point([this]() -> StatusOr<std::optional<SourceReplicator::BasePoint>> {
      ASSIGN_OR_RETURN(auto p, Catalog(*b_->catalog).Get("vol1", 2));
      return std::optional<SourceReplicator::BasePoint>({p, keep_b_});
    });
    return rep;
  }

  std::vector<std::string> SnapNames(Volume& v) {
    std::vector<std::string> out;
    const std::vector<SnapInfo> snaps = v.ListSnaps().value();
    for (const auto& s : snaps) out.push_back(s.name);
    return out;
  }

  std::filesystem::path dir_;
  std::unique_ptr<Site> a_, b_;
  std::vector<std::thread> sessions_;
  std::mt19937_64 rng_{24};
  bool keep_b_ = false;  // the operator chose site B's writes
};

TEST_F(FailbackTest, ThePromotedImageReplicatesBackAsADeltaAndADivergenceIsKept) {
  const std::string a_before = FailOverWithWritesOnBothSides(/*a_writes=*/true);
  auto p = testing::MustOpen(*b_->pool, "img-p");
  EXPECT_EQ(SnapNames(*p), std::vector<std::string>{"cairn.2"}) << "promote takes cairn.<seq>";
  testing::Write(*p, 0, testing::RandomBytes(rng_, 2 * 65536));

  // Both sites wrote since point 2: a split brain, and nothing moves.
  auto rep = Reverse();
  auto refused = rep->RunOnce();
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("split brain: since restore point 2 of volume 'vol1', site a changed "
                        "262144 bytes of rbd/img and site b changed 131072 bytes"));
  EXPECT_THAT(refused.status().message(), HasSubstr("cairn resolve vol1 --keep b"));
  EXPECT_THAT(a_->sink->Report()[0].error, HasSubstr("split brain"));
  EXPECT_EQ(a_->sink->Points("vol1").status().code(), Code::kNotFound);
  auto img_before = testing::MustOpen(*a_->pool, "img");
  EXPECT_EQ(SnapNames(*img_before), (std::vector<std::string>{"cairn.1", "cairn.2", "cairn.3"}));
  EXPECT_EQ(testing::ImageHash(*img_before, "", kSize), a_before);

  // The operator chooses site B.
  keep_b_ = true;
  rep->Disconnect();
  auto sum = rep->RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 3u);
  EXPECT_EQ(sum->id.base_seq, 2u);
  EXPECT_LE(sum->data_bytes, 2 * 65536u) << "more than B wrote went back";
  auto img = testing::MustOpen(*a_->pool, "img");
  EXPECT_EQ(testing::ImageHash(*img, "cairn.3", kSize), testing::ImageHash(*p, "cairn.3", kSize));
  EXPECT_EQ(testing::ImageHash(*img, "", kSize), testing::ImageHash(*p, "", kSize));

  // A's writes since point 2 are kept: its head as it was, and its own
  // later snapshot under a new name.
  std::string head_kept, snap_kept;
  for (const auto& name : SnapNames(*img)) {
    if (name.starts_with("cairn-divergent-") && name.ends_with(".cairn.3")) snap_kept = name;
    if (name.starts_with("cairn-divergent-") && !name.ends_with(".cairn.3")) head_kept = name;
  }
  ASSERT_FALSE(head_kept.empty()) << ::testing::PrintToString(SnapNames(*img));
  ASSERT_FALSE(snap_kept.empty()) << ::testing::PrintToString(SnapNames(*img));
  EXPECT_EQ(testing::ImageHash(*img, head_kept, kSize), a_before);

  // The points at A go on as a chain from the adopted one.
  auto pts = a_->sink->Points("vol1");
  ASSERT_TRUE(pts.ok()) << pts.status().ToString();
  ASSERT_EQ(pts->size(), 2u);
  EXPECT_EQ((*pts)[0].epoch.seq, 2u);
  EXPECT_EQ((*pts)[0].image, "img");
  EXPECT_EQ((*pts)[0].chain_digest, b_->sink->Points("vol1")->back().chain_digest);
  testing::RandomChanges(*p, rng_, kSize, 4);
  auto next = rep->RunOnce();
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->id.base_seq, 3u);
  EXPECT_EQ(testing::ImageHash(*img, "cairn.4", kSize), testing::ImageHash(*p, "cairn.4", kSize));
}

TEST_F(FailbackTest, WithoutWritesAtANothingIsKeptAndOnlyBsChangesMove) {
  FailOverWithWritesOnBothSides(/*a_writes=*/false);
  auto p = testing::MustOpen(*b_->pool, "img-p");
  testing::Write(*p, 3 * kMiB, testing::RandomBytes(rng_, 65536));
  auto sum = Reverse()->RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->data_bytes, 65536u);
  auto img = testing::MustOpen(*a_->pool, "img");
  EXPECT_EQ(testing::ImageHash(*img, "", kSize), testing::ImageHash(*p, "", kSize));
  for (const auto& name : SnapNames(*img)) EXPECT_THAT(name, StartsWith("cairn."));
}

TEST_F(FailbackTest, AnImageAGuestHoldsOpenIsNotWritten) {
  FailOverWithWritesOnBothSides(/*a_writes=*/true);
  ASSERT_TRUE(a_->pool->SetOtherClients("img", {"10.0.0.9:0/4242"}).ok());
  auto img = testing::MustOpen(*a_->pool, "img");
  const std::string before = testing::ImageHash(*img, "", kSize);
  auto rep = Reverse();
  auto refused = rep->RunOnce();
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("rbd/img is held open by 10.0.0.9:0/4242"));
  EXPECT_EQ(testing::ImageHash(*img, "", kSize), before);
  EXPECT_EQ(a_->sink->Points("vol1").status().code(), Code::kNotFound);
  rep->Disconnect();
  ASSERT_TRUE(a_->pool->SetOtherClients("img", {}).ok());  // the guest detached
  auto sum = rep->RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(testing::ImageHash(*img, "", kSize),
            testing::ImageHash(*testing::MustOpen(*b_->pool, "img-p"), "", kSize));
}

TEST_F(FailbackTest, AnImageWithoutTheSameSnapshotIsNotAdoptedNorWritten) {
  FailOverWithWritesOnBothSides(/*a_writes=*/false);
  // A's image was recreated meanwhile: same snapshot name, another time.
  ASSERT_TRUE(a_->pool->Open("img").value()->RemoveSnap("cairn.2").ok());
  ASSERT_TRUE(a_->pool->Open("img").value()->RemoveSnap("cairn.1").ok());
  ASSERT_TRUE(a_->pool->Remove("img").ok());
  ASSERT_TRUE(a_->pool->Create("img", kSize).ok());
  auto img = testing::MustOpen(*a_->pool, "img");
  testing::Write(*img, 0, "another volume's data");
  ASSERT_TRUE(img->CreateSnap("cairn.2").ok());
  const std::string before = testing::ImageHash(*img, "", kSize);
  auto sum = Reverse()->RunOnce();
  ASSERT_FALSE(sum.ok());
  EXPECT_EQ(sum.status().code(), Code::kFailedPrecondition) << sum.status().ToString();
  EXPECT_THAT(sum.status().message(), HasSubstr("has no snapshot of restore point 2"));
  EXPECT_THAT(sum.status().message(), HasSubstr("`cairn resolve vol1 --keep b`"));
  EXPECT_EQ(testing::ImageHash(*img, "", kSize), before);
  EXPECT_EQ(SnapNames(*img), std::vector<std::string>{"cairn.2"});
  EXPECT_EQ(a_->sink->Points("vol1").status().code(), Code::kNotFound);
}

// A's image lost the point it shares with B (its snapshots pruned) and A
// wrote after it. Once the operator chooses B's side, A's image as it was
// is kept as a snapshot, and the first epoch back compares the two images
// block by block: only the blocks that differ move.
TEST_F(FailbackTest, AnImageThatLostTheSharedPointIsResyncedByDigestsOnceChosen) {
  FailOverWithWritesOnBothSides(/*a_writes=*/true);
  auto img = testing::MustOpen(*a_->pool, "img");
  for (const char* snap : {"cairn.1", "cairn.2"}) ASSERT_TRUE(img->RemoveSnap(snap).ok());
  const std::string a_before = testing::ImageHash(*img, "", kSize);
  auto p = testing::MustOpen(*b_->pool, "img-p");
  testing::Write(*p, 3 * kMiB, testing::RandomBytes(rng_, 2 * 65536));
  auto rep = Reverse();
  auto refused = rep->RunOnce();
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("has no snapshot of restore point 2"));
  EXPECT_EQ(testing::ImageHash(*img, "", kSize), a_before);
  rep->Disconnect();
  keep_b_ = true;  // cairn resolve vol1 --keep b
  // The first epoch back is the promoted point itself, made from A's image
  // by the 4 grains A wrote since (as data, or zeros where the point has
  // none), not by a copy.
  auto sum = rep->RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 2u);
  EXPECT_EQ(sum->id.base_seq, 0u);
  EXPECT_GE(sum->data_bytes + sum->zero_bytes, 65536u);
  EXPECT_LE(sum->data_bytes + sum->zero_bytes, 4 * 65536u);
  EXPECT_EQ(testing::ImageHash(*img, "", kSize), testing::ImageHash(*p, "cairn.2", kSize));
  // A's image as it was, and its later snapshot, are kept.
  std::vector<std::string> kept;
  for (const std::string& n : SnapNames(*img)) {
    if (n.starts_with("cairn-divergent-")) kept.push_back(n);
  }
  std::sort(kept.begin(), kept.end());
  ASSERT_EQ(kept.size(), 2u) << ::testing::PrintToString(SnapNames(*img));
  EXPECT_EQ(kept[0] + ".cairn.3", kept[1]);
  EXPECT_EQ(testing::ImageHash(*img, kept[0], kSize), a_before);
  // Then deltas, as after any adoption: B's writes, then one more.
  for (const uint64_t grains : {2, 1}) {
    auto next = rep->RunOnce();
    ASSERT_TRUE(next.ok()) << next.status().ToString();
    EXPECT_EQ(next->id.base_seq, next->id.seq - 1);
    EXPECT_EQ(next->data_bytes + next->zero_bytes, grains * 65536u);
    EXPECT_EQ(testing::ImageHash(*img, "", kSize), testing::ImageHash(*p, "", kSize));
    testing::Write(*p, 0, testing::RandomBytes(rng_, 4096));
  }
}

// A member of a consistency group: its point 2 was read from its share of
// the group snapshot, so A's image has no cairn.2 of that time to adopt.
// The share proves the image is the volume's: with writes at B only, the
// way back needs no operator (a resync by digests, only what differs
// moves); with writes at both sites, it is a split brain.
TEST_F(FailbackTest, AGroupMembersShareOfThePointIsAdoptedWithoutAnOperator) {
  for (const bool a_writes : {true, false}) {
    SCOPED_TRACE(a_writes ? "both sites wrote" : "site B wrote");
    for (auto& t : sessions_) t.join();  // the last round's links are closed
    sessions_.clear();
    a_ = std::make_unique<Site>("a", dir_ / (a_writes ? "a1" : "a2"));
    b_ = std::make_unique<Site>("b", dir_ / (a_writes ? "b1" : "b2"));
    auto member = GroupMemberAtA();
    auto img = testing::MustOpen(*a_->pool, "img");
    {
      GroupSource group("app", a_->pool, std::chrono::milliseconds(0), {member});
      member->Start();
      for (uint64_t seq = 1; seq <= 2; ++seq) {
        testing::RandomChanges(*img, rng_, kSize, 8);
        ASSERT_TRUE(group.TakeInstant().ok());
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (true) {
          auto points = b_->sink->Points("vol1");
          if (points.ok() && points->back().epoch.seq == seq) break;
          ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "no point " << seq << " at B";
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      }
      member->Stop();
    }
    ASSERT_EQ(Catalog(*b_->catalog).Get("vol1", 2).value().epoch.group, "app");
    ASSERT_TRUE(b_->sink->Promote("vol1", 0, "", "img-p").ok());
    auto p = testing::MustOpen(*b_->pool, "img-p");
    testing::Write(*p, 0, testing::RandomBytes(rng_, 2 * 65536));
    if (a_writes) testing::Write(*img, kMiB, testing::RandomBytes(rng_, 65536));
    const std::string a_before = testing::ImageHash(*img, "", kSize);
    auto rep = Reverse();
    auto sum = rep->RunOnce();
    if (a_writes) {
      ASSERT_FALSE(sum.ok());
      EXPECT_EQ(sum.status().code(), Code::kFailedPrecondition) << sum.status().ToString();
      EXPECT_THAT(sum.status().message(),
                  HasSubstr("split brain: since group restore point 2 of volume 'vol1'"));
      EXPECT_THAT(sum.status().message(), HasSubstr("cairn resolve vol1 --keep b"));
      EXPECT_EQ(testing::ImageHash(*img, "", kSize), a_before);
      EXPECT_EQ(a_->sink->Points("vol1").status().code(), Code::kNotFound);
      rep->Disconnect();
      continue;
    }
    // A's image is unchanged since its share of the point, so it is the
    // point: adopted (its own cairn.2, taken just before the group's, kept
    // aside), and the first epoch back is a delta of what B wrote, only.
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    EXPECT_EQ(sum->id.seq, 3u);
    EXPECT_EQ(sum->id.base_seq, 2u) << "not a delta from the adopted point";
    EXPECT_EQ(sum->data_bytes + sum->zero_bytes, 2 * 65536u);
    EXPECT_EQ(testing::ImageHash(*img, "", kSize), testing::ImageHash(*p, "", kSize));
    EXPECT_EQ(testing::ImageHash(*img, "cairn.2", kSize), testing::ImageHash(*p, "cairn.2", kSize));
    const auto snaps = img->ListSnaps().value();
    EXPECT_TRUE(std::any_of(snaps.begin(), snaps.end(), [](const SnapInfo& s) {
      return s.name.starts_with("cairn-divergent-") && s.name.ends_with(".cairn.2");
    })) << "A's own cairn.2 was not kept";
    rep->Disconnect();
  }
}

// Site A's group goes on until it learns that B failed over. Once A's
// sink took the image back, the group takes no instant of it: a cairn.<N>
// of the group's would be taken by the sink for its point N (a snapshot
// from before B's epoch N was written), or be removed, the sink's with
// it, when the instant fails.
TEST_F(FailbackTest, AGroupAtTheOldPrimaryTakesNoInstantOfAnImageTakenBack) {
  auto member = GroupMemberAtA();
  auto img = testing::MustOpen(*a_->pool, "img");
  member->set_stand_down(StandDownAtA());
  member->set_image_gate(a_->gate);
  GroupSource group("app", a_->pool, std::chrono::milliseconds(0), {member});
  for (uint64_t seq = 1; seq <= 2; ++seq) {
    testing::RandomChanges(*img, rng_, kSize, 8);
    ASSERT_TRUE(group.TakeInstant().ok());
    auto sum = member->RunOnce();
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    ASSERT_EQ(sum->id.seq, seq);
  }
  member->Disconnect();
  ASSERT_TRUE(b_->sink->Promote("vol1", 0, "", "img-p").ok());
  auto p = testing::MustOpen(*b_->pool, "img-p");
  auto rep = Reverse();
  for (uint64_t seq = 3; seq <= 4; ++seq) {
    testing::Write(*p, seq * 65536, testing::RandomBytes(rng_, 65536));
    auto sum = rep->RunOnce();
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    ASSERT_EQ(sum->id.seq, seq);
    const std::vector<std::string> before = SnapNames(*img);
    auto refused = group.TakeInstant();
    ASSERT_FALSE(refused.ok()) << "group instant " << *refused << " of an image taken back";
    EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
    EXPECT_THAT(refused.status().message(),
                HasSubstr("no snapshot of rbd/img is taken from here: the standby of vol1"));
    EXPECT_EQ(SnapNames(*img), before);
    EXPECT_EQ(member->Report().state, VolumeState::kStandby);
  }
  rep->Disconnect();
  for (const std::string snap : {"cairn.3", "cairn.4"}) {
    EXPECT_EQ(testing::ImageHash(*img, snap, kSize), testing::ImageHash(*p, snap, kSize)) << snap;
  }
  EXPECT_EQ(a_->sink->Points("vol1").value().back().epoch.seq, 4u);
}

TEST_F(FailbackTest, APlannedFailbackHandsTheImageBackAndResumesAsADeltaBothWays) {
  FailOverWithWritesOnBothSides(/*a_writes=*/false);
  auto p = testing::MustOpen(*b_->pool, "img-p");
  auto rep = Reverse();
  testing::Write(*p, 0, testing::RandomBytes(rng_, 2 * 65536));
  ASSERT_TRUE(rep->RunOnce().ok());
  testing::Write(*p, 3 * kMiB, testing::RandomBytes(rng_, 65536));
  auto last = rep->RunOnce();
  ASSERT_TRUE(last.ok()) << last.status().ToString();
  ASSERT_EQ(last->id.seq, 4u);
  rep->Disconnect();

  // Site A's own source stands by while A's sink owns its image.
  SourceReplicator home(Config("img", "img-standby"), "a", a_->pool, ConnectTo(*b_));
  home.set_stand_down(StandDownAtA());
  auto refused = home.RequestNow();
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("cairn failback vol1"));
  EXPECT_EQ(home.Report().state, VolumeState::kStandby);

  // Only the newest point A applied can be handed back.
  auto early = rep->HandBack(3);
  ASSERT_FALSE(early.ok());
  EXPECT_THAT(early.status().message(), HasSubstr("is 4, not 3"));
  auto chain = rep->HandBack(4);
  ASSERT_TRUE(chain.ok()) << chain.status().ToString();
  EXPECT_EQ(chain->chain, last->chain) << "the chain of point 4 as site A applied it";
  EXPECT_EQ(chain->site, "a");
  EXPECT_EQ(a_->sink->Points("vol1").status().code(), Code::kNotFound);
  EXPECT_EQ(Catalog(*a_->catalog).ImageOwner("rbd", "img").value(), "");
  ASSERT_TRUE(rep->HandBack(4).ok()) << "asked again once done, the same answer";
  ASSERT_TRUE(home.RequestNow().ok());
  EXPECT_NE(home.Report().state, VolumeState::kStandby);

  // Site B takes point 4 into its standby image from the promoted one.
  auto folded = b_->sink->FoldBack("vol1", 4, *chain);
  ASSERT_TRUE(folded.ok()) << folded.status().ToString();
  EXPECT_EQ(folded->copied_bytes, 3 * 65536u) << "what B wrote since the promotion, no more";
  EXPECT_THAT(folded->kept_as, StartsWith("img-p.failback-"));
  auto pts = b_->sink->Points("vol1").value();
  EXPECT_EQ(pts.back().epoch.seq, 4u);
  EXPECT_EQ(pts.back().epoch.source_site, "a");
  EXPECT_EQ(pts.back().chain_digest, chain->chain);
  auto standby = testing::MustOpen(*b_->pool, "img-standby");
  auto img = testing::MustOpen(*a_->pool, "img");
  const std::string at4 = testing::ImageHash(*img, "", kSize);
  EXPECT_EQ(testing::ImageHash(*standby, "cairn.4", kSize), at4);
  auto kept = testing::MustOpen(*b_->pool, folded->kept_as);
  EXPECT_EQ(testing::ImageHash(*kept, "", kSize), at4) << "the promoted image is kept as it was";

  // A replicates to B again, as a delta from point 4.
  testing::Write(*img, 2 * kMiB, testing::RandomBytes(rng_, 65536));
  auto next = home.RunOnce();
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->id.seq, 5u);
  EXPECT_EQ(next->id.base_seq, 4u);
  EXPECT_EQ(next->data_bytes, 65536u);
  EXPECT_EQ(testing::ImageHash(*standby, "cairn.5", kSize), testing::ImageHash(*img, "", kSize));
  EXPECT_EQ(b_->sink->FoldBack("vol1", 4, *chain).status().code(), Code::kFailedPrecondition)
      << "not failed over any more";
}

TEST_F(FailbackTest, ASnapshotOfTheSameNameFromAnotherHistoryIsNoBaseForADelta) {
  ASSERT_TRUE(a_->pool->Create("img", kSize).ok());
  {
    auto img = testing::MustOpen(*a_->pool, "img");
    testing::Write(*img, 0, testing::RandomBytes(rng_, kSize));
  }
  SourceReplicator forward(Config("img", "img-standby"), "a", a_->pool, ConnectTo(*b_));
  ASSERT_TRUE(forward.RunOnce().ok());
  forward.Disconnect();
  // The image is made anew under its name, with a cairn.1 of its own.
  for (const auto& s : SnapNames(*testing::MustOpen(*a_->pool, "img"))) {
    ASSERT_TRUE(a_->pool->Open("img").value()->RemoveSnap(s).ok());
  }
  ASSERT_TRUE(a_->pool->Remove("img").ok());
  ASSERT_TRUE(a_->pool->Create("img", kSize).ok());
  auto img = testing::MustOpen(*a_->pool, "img");
  testing::Write(*img, kMiB, testing::RandomBytes(rng_, 65536));
  ASSERT_TRUE(img->CreateSnap("cairn.1").ok());
  testing::Write(*img, 2 * kMiB, testing::RandomBytes(rng_, 65536));
  auto sum = forward.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 2u);
  auto standby = testing::MustOpen(*b_->pool, "img-standby");
  EXPECT_EQ(testing::ImageHash(*standby, "cairn.2", kSize),
            testing::ImageHash(*img, "cairn.2", kSize))
      << "a delta from another history's cairn.1 made a wrong point";
}

}  // namespace
}  // namespace cairn
