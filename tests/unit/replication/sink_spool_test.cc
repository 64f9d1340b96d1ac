// The sink over the Spool seam's twin and fault layer: a full disk in the
// middle of an epoch and a sync torn by a crash, with no file on disk. The
// spool store outlives each sink, as a disk outlives its cairnd; a restart
// after a crash drops what was not synced (MemorySpoolStore::DropUnsynced).
#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/link/link.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/fault_spool_store.h"
#include "engine/spool/memory_spool_store.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

constexpr uint64_t kMiB = 1 << 20;

class SinkSpoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    site_a_ = std::make_shared<MemoryPool>("rbd");
    site_b_ = std::make_shared<MemoryPool>("rbd");
    catalog_ = std::make_shared<MemoryKvStore>();
    StartSink();
    ASSERT_TRUE(site_a_->Create("img", 4 * kMiB).ok());
    src_ = testing::MustOpen(*site_a_, "img");
    std::mt19937_64 rng(31);
    testing::Write(*src_, 0, testing::RandomBytes(rng, 3 * kMiB));  // 12 records of 256 KiB
  }
  void TearDown() override { StopSink(); }

  void StartSink() {
    SinkEnv env;
    env.site = "b";
    env.spools = spools_;
    env.pools = {"rbd"};
    env.open_pool = [this](const std::string&) -> StatusOr<std::shared_ptr<Pool>> {
      return std::shared_ptr<Pool>(site_b_);
    };
    env.open_catalog = [this](const std::string&) -> StatusOr<std::shared_ptr<KvStore>> {
      return std::shared_ptr<KvStore>(catalog_);
    };
    sink_ = std::make_unique<Sink>(env);
  }
  void StopSink() {
    for (auto& t : sessions_) t.join();
    sessions_.clear();
    sink_.reset();
  }
  // cairnd killed and started again: what was not synced is gone.
  void CrashAndRestartSink() {
    StopSink();
    memory_->DropUnsynced();
    StartSink();
  }

  SourceReplicator::Connector Connector() {
    return [this]() -> StatusOr<std::unique_ptr<Link>> {
      auto [a, b] = MakeMemoryLinkPair(16u << 20);
      sessions_.emplace_back([this, l = std::move(b)]() mutable {
        [[maybe_unused]] const Status ended = sink_->Serve(*l);
      });
      return std::move(a);
    };
  }

  VolumeConfig Config() {
    VolumeConfig c;
    c.id = "vol1";
    c.pool = "rbd";
    c.image = "img";
    c.target_pool = "rbd";
    c.target_image = "img-standby";
    c.keep_snapshots = 100;
    c.block_size = 256 * 1024;
    return c;
  }

  // Whole frames at the start of epoch `seq`'s spool, and what ended them.
  std::pair<int, std::string> WholeFrames(uint64_t seq) {
    auto reader = memory_->Open("vol1", seq);
    if (!reader.ok()) return {0, reader.status().ToString()};
    for (int n = 0;; ++n) {
      auto f = (*reader)->Next();
      if (!f.ok()) return {n, f.status().ToString()};
    }
  }

  // The one restore point equals the source's snapshot, by content.
  void VerifyPoint() {
    auto pts = sink_->Points("vol1");
    ASSERT_TRUE(pts.ok()) << pts.status().ToString();
    ASSERT_EQ(pts->size(), 1u);
    auto dst = testing::MustOpen(*site_b_, "img-standby");
    const RestorePoint& p = (*pts)[0];
    EXPECT_EQ(testing::ImageHash(*dst, p.snap, p.epoch.image_size),
              testing::ImageHash(*src_, SnapName(p.epoch.seq), p.epoch.image_size));
  }

  std::shared_ptr<MemorySpoolStore> memory_ = std::make_shared<MemorySpoolStore>("/memory/spool");
  std::shared_ptr<FaultSpoolStore> spools_ = std::make_shared<FaultSpoolStore>(*memory_);
  std::shared_ptr<MemoryPool> site_a_, site_b_;
  std::shared_ptr<MemoryKvStore> catalog_;
  std::unique_ptr<Volume> src_;
  std::unique_ptr<Sink> sink_;
  std::vector<std::thread> sessions_;
};

TEST_F(SinkSpoolTest, DiskFullMidEpochKeepsTheVerifiedPrefixAndTheSourceResumes) {
  int appends = 0;
  spools_->SetFault([&](const SpoolFaultPoint& p) -> SpoolFault {
    // EpochBegin and three records fit; the fourth record does not.
    if (p.op == SpoolOp::kAppend && ++appends == 5) {
      return ResourceExhausted("spool disk full: injected").WithReason(Reason::kSpoolDiskFull);
    }
    return {};
  });
  auto rep = std::make_unique<SourceReplicator>(Config(), "a", site_a_, Connector());
  ASSERT_FALSE(rep->RunOnce().ok());
  EXPECT_EQ(sink_->Report()[0].error,
            "ResourceExhausted: spool disk full: injected; free space in /memory/spool or move "
            "[sink] spool_dir; 3 verified records of epoch 1 are kept, the source resumes after "
            "them");
  EXPECT_EQ(*memory_->List("vol1"), (std::vector<uint64_t>{1}));
  spools_->SetFault(nullptr);
  CrashAndRestartSink();  // the refusal lasts a minute; a restarted sink takes it at once
  // EpochBegin and three records survived the crash.
  EXPECT_EQ(WholeFrames(1), std::make_pair(4, std::string("Aborted: end of spool")));
  auto resumed = rep->RunOnce();
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->id.seq, 1u);
  VerifyPoint();
  rep.reset();  // its link closes: the session ends
  StopSink();   // and its spool removal has run
  EXPECT_TRUE(memory_->List("vol1")->empty());
}

TEST_F(SinkSpoolTest, ATornSyncAtEpochEndKeepsTheWholeRecordsBeforeTheTear) {
  spools_->SetFault([&](const SpoolFaultPoint& p) -> SpoolFault {
    // At EpochEnd nothing is synced yet: keep 2.5 records' worth.
    if (p.op == SpoolOp::kSync && p.offset == 0) {
      return SpoolFault(Unavailable("injected: the host lost power"), 5 * 128 * 1024);
    }
    return {};
  });
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  ASSERT_FALSE(rep.RunOnce().ok());
  spools_->SetFault(nullptr);
  CrashAndRestartSink();
  EXPECT_EQ(*memory_->List("vol1"), (std::vector<uint64_t>{1}));
  // EpochBegin and two records are whole; the third is torn.
  const auto [whole, end] = WholeFrames(1);
  EXPECT_EQ(whole, 3);
  EXPECT_TRUE(end.starts_with("DataLoss: torn or corrupt frame at spool offset ")) << end;
  auto resumed = rep.RunOnce();
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->id.seq, 1u);
  VerifyPoint();
}

}  // namespace
}  // namespace cairn
