// Drills: a restore point cloned while the volume replicates on, held
// against retention until the drill stops.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "tests/unit/replication/replication_fixture.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<uint64_t> Seqs(const std::vector<RestorePoint>& pts) {
  std::vector<uint64_t> out;
  for (const auto& p : pts) out.push_back(p.epoch.seq);
  return out;
}

TEST_F(ReplicationTest, ADrillHoldsItsPointAgainstRetentionUntilItStops) {
  SinkEnv env = sink_env_;
  env.keep_points = 2;
  RestartSink(env);
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(71);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  ASSERT_TRUE(rep.RunOnce().ok());
  auto drill = sink_->DrillStart("vol1", 0, "");
  ASSERT_TRUE(drill.ok()) << drill.status().ToString();
  EXPECT_EQ(drill->image, "img-standby-drill-1");
  EXPECT_EQ(drill->point.epoch.seq, 1u);
  EXPECT_EQ(sink_->DrillStart("vol1", 1, "").status().code(), Code::kAlreadyExists);
  // Replication goes on; retention keeps the newest two and the held one.
  for (int i = 0; i < 3; ++i) {
    testing::Write(*src, (i + 1) * 256 * 1024, testing::RandomBytes(rng, 4096));
    ASSERT_TRUE(rep.RunOnce().ok());
  }
  PollUntil("retention keeping points 1 (held), 3 and 4", [&] {
    return Seqs(*sink_->Points("vol1")) == std::vector<uint64_t>{1, 3, 4};
  });
  auto pts = *sink_->Points("vol1");
  EXPECT_THAT(pts[0].held_by, ElementsAre("img-standby-drill-1"));
  EXPECT_TRUE(pts[1].held_by.empty());
  // The clone holds point 1 as its source snapshot cairn.1 holds it.
  EXPECT_EQ(testing::ImageHash(*testing::MustOpen(*site_b_, "img-standby-drill-1"), "", size),
            testing::ImageHash(*src, "cairn.1", size));

  auto stopped = sink_->DrillStop("vol1", "");
  ASSERT_TRUE(stopped.ok()) << stopped.status().ToString();
  EXPECT_THAT(*stopped, ElementsAre("img-standby-drill-1"));
  EXPECT_FALSE(*site_b_->Exists("img-standby-drill-1"));
  EXPECT_THAT(sink_->DrillStop("vol1", "").status().message(), HasSubstr("has no drill"));
  // The next pass drops the point no longer held.
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  ASSERT_TRUE(rep.RunOnce().ok());
  PollUntil("retention dropping point 1 once released", [&] {
    return Seqs(*sink_->Points("vol1")) == std::vector<uint64_t>{4, 5};
  });
}

}  // namespace
}  // namespace cairn
