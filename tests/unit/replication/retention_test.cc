// Retention tiers: which points a sink keeps (PointsToKeep), the tiers'
// syntax, and the sink pruning by them.
#include "engine/replication/retention.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "tests/unit/replication/replication_fixture.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kMin = 60'000'000'000;
// 2026-12-07T00:00:00Z, a Monday.
constexpr int64_t kMonday = 1'796'601'600'000'000'000;

std::vector<RestorePoint> PointsAt(const std::vector<int64_t>& times) {
  std::vector<RestorePoint> out;
  for (size_t i = 0; i < times.size(); ++i) {
    RestorePoint p;
    p.epoch.seq = i + 1;
    p.epoch.snap_time_ns = times[i];
    out.push_back(p);
  }
  return out;
}

TEST(Retention, TiersParseAndBadOnesSayWhy) {
  auto t = ParseRetentionTiers("10m*6 1h*24, 1d*365  1w*52 1mo*12");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_EQ(t->size(), 5u);
  EXPECT_EQ((*t)[0], (RetentionTier{10 * kMin, false, 6}));
  EXPECT_EQ((*t)[3], (RetentionTier{7 * 24 * 60 * kMin, false, 52}));
  EXPECT_EQ((*t)[4], (RetentionTier{0, true, 12}));
  EXPECT_TRUE(ParseRetentionTiers("")->empty());
  for (const char* bad : {"1h", "1h*0", "0h*3", "1y*2", "2mo*3", "h*3", "1h*x"}) {
    auto r = ParseRetentionTiers(bad);
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_THAT(r.status().message(), HasSubstr("PERIOD*COUNT")) << bad;
  }
}

TEST(Retention, TheNewestOfEachPeriodAndTheNewestN) {
  // A point every 5 minutes for 3 hours: 36 points, the newest at 02:55.
  std::vector<int64_t> times;
  for (int i = 0; i < 36; ++i) times.push_back(kMonday + i * 5 * kMin);
  const auto points = PointsAt(times);
  // The newest 2; 10-minute periods for the last 6 (02:50, 02:40, ... 02:00:
  // the later point of each pair); hours for the last 3 (02:55, 01:55, 00:55).
  const auto keep = PointsToKeep(points, 2, *ParseRetentionTiers("10m*6 1h*3"));
  EXPECT_EQ(keep, (std::set<uint64_t>{36, 35, 34, 32, 30, 28, 26, 24, 12}));
  EXPECT_EQ(PointsToKeep(points, 0, {}), std::set<uint64_t>{});
  EXPECT_EQ(PointsToKeep(points, 40, {}).size(), 36u);
}

TEST(Retention, DaysWeeksAndMonthsFollowTheCalendarInUtc) {
  const int64_t day = 24 * 60 * kMin;
  // Sun 2026-12-06 23:00, Mon 12-07 01:00, Mon 12-07 22:00, Wed 12-09,
  // Thu 2027-01-07.
  const auto points = PointsAt({kMonday - 60 * kMin, kMonday + 60 * kMin, kMonday + 22 * 60 * kMin,
                                kMonday + 2 * day, kMonday + 31 * day});
  EXPECT_EQ(PointsToKeep(points, 0, *ParseRetentionTiers("1d*10")),
            (std::set<uint64_t>{1, 3, 4, 5}));
  EXPECT_EQ(PointsToKeep(points, 0, *ParseRetentionTiers("1w*10")),
            (std::set<uint64_t>{1, 4, 5}));  // weeks from Monday
  EXPECT_EQ(PointsToKeep(points, 0, *ParseRetentionTiers("1mo*10")), (std::set<uint64_t>{4, 5}));
  EXPECT_EQ(PointsToKeep(points, 0, *ParseRetentionTiers("1mo*1")), std::set<uint64_t>{5});
}

// The sink prunes by the tiers: points a minute apart (site A's snapshots
// stamped by the test's clock), an hourly tier and the newest two.
TEST_F(ReplicationTest, TheSinkKeepsTheTiersPointsAndTheirSnapshots) {
  UseManualClock();
  SinkEnv env = sink_env_;
  env.keep_points = 2;
  env.retention_tiers = *ParseRetentionTiers("1h*3");
  RestartSink(env);
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(81);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  rep.set_clock(clock_);
  // Points at 00:30, 00:50, 01:10, 01:30, 01:50, 02:10, 02:30 of some day.
  clock_.Advance(std::chrono::minutes(30) -
                 std::chrono::nanoseconds(clock_.UnixNs() % 3'600'000'000'000));
  for (int i = 0; i < 7; ++i) {
    testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
    ASSERT_TRUE(rep.RunOnce().ok());
    clock_.Advance(std::chrono::minutes(20));
  }
  // Hours: 02 -> point 7, 01 -> point 5, 00 -> point 2; the newest two: 6, 7.
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  PollUntil("retention keeping points 2, 5, 6, 7", [&] {
    std::vector<uint64_t> seqs;
    const std::vector<RestorePoint> points = sink_->Points("vol1").value();
    for (const auto& p : points) seqs.push_back(p.epoch.seq);
    return seqs == std::vector<uint64_t>{2, 5, 6, 7};
  });
  std::vector<std::string> snaps;
  const std::vector<SnapInfo> listed = dst->ListSnaps().value();
  for (const auto& s : listed) snaps.push_back(s.name);
  EXPECT_EQ(snaps, (std::vector<std::string>{"cairn.2", "cairn.5", "cairn.6", "cairn.7"}));
  VerifyAllPoints(*src, 4);
}

// The source keeps its own snapshots by tiers too: besides the base and
// the newest keep_snapshots older one, the newest older one of each of the
// last 3 hours. Points a minute apart, as above.
TEST_F(ReplicationTest, TheSourceKeepsItsSnapshotsByTheirOwnTiers) {
  UseManualClock();
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(84);
  VolumeConfig c = Config();
  c.keep_snapshots = 1;
  c.snapshot_tiers = *ParseRetentionTiers("1h*3");
  SourceReplicator rep(c, "a", site_a_, Connector());
  rep.set_clock(clock_);
  // Snapshots at 00:30, 00:50, 01:10, 01:30, 01:50, 02:10, 02:30.
  clock_.Advance(std::chrono::minutes(30) -
                 std::chrono::nanoseconds(clock_.UnixNs() % 3'600'000'000'000));
  std::map<uint64_t, std::string> want;
  for (int i = 0; i < 7; ++i) {
    testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
    auto sum = rep.RunOnce();
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    want[sum->id.seq] = testing::ImageHash(*src, SnapName(sum->id.seq), kMiB);
    clock_.Advance(std::chrono::minutes(20));
  }
  // The base 7 and the newest older one, 6; hours 02 -> 6, 01 -> 5, 00 -> 2.
  std::vector<std::string> snaps;
  const std::vector<SnapInfo> listed = src->ListSnaps().value();
  for (const auto& s : listed) snaps.push_back(s.name);
  EXPECT_EQ(snaps, (std::vector<std::string>{"cairn.2", "cairn.5", "cairn.6", "cairn.7"}));
  for (uint64_t seq : {2, 5, 6, 7}) {
    EXPECT_EQ(testing::ImageHash(*src, SnapName(seq), kMiB), want[seq]) << "cairn." << seq;
  }
}

// A volume's own rules (its source's, carried in Hello) add to the sink's
// for that volume alone, never undercut them: with the sink's 2 newest, a
// volume asking for 3 keeps 3, one asking for 1 keeps 2, and one without
// keeps 2; a source whose rules do not parse is refused before anything
// of the volume is read.
TEST_F(ReplicationTest, AVolumesOwnRulesAddToTheSinksForItAlone) {
  SinkEnv env = sink_env_;
  env.keep_points = 2;
  RestartSink(env);
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  VolumeConfig own = Config();
  own.retention = RetentionRules{3, {}};
  std::vector<VolumeConfig> others(2, Config());
  for (int i = 0; i < 2; ++i) {
    others[i].id = fmt::format("vol{}", i + 2);
    others[i].image = fmt::format("other{}", i + 2);
    others[i].target_image = others[i].image + "-standby";
    ASSERT_TRUE(site_a_->Create(others[i].image, kMiB).ok());
  }
  others[1].retention = RetentionRules{1, {}};
  std::vector<std::unique_ptr<SourceReplicator>> reps;
  for (const auto& c : {own, others[0], others[1]}) {
    reps.push_back(std::make_unique<SourceReplicator>(c, "a", site_a_, Connector()));
  }
  std::mt19937_64 rng(83);
  for (int i = 0; i < 5; ++i) {
    for (const auto& c : {own, others[0], others[1]}) {
      testing::Write(*testing::MustOpen(*site_a_, c.image), 0, testing::RandomBytes(rng, 4096));
    }
    for (auto& rep : reps) ASSERT_TRUE(rep->RunOnce().ok());
  }
  const auto seqs = [&](const std::string& volume) {
    std::vector<uint64_t> out;
    const std::vector<RestorePoint> points = sink_->Points(volume).value();
    for (const auto& p : points) out.push_back(p.epoch.seq);
    return out;
  };
  PollUntil("vol1 keeping its own 3 newest points, vol2 and vol3 the sink's 2", [&] {
    return seqs("vol1") == std::vector<uint64_t>{3, 4, 5} &&
           seqs("vol2") == std::vector<uint64_t>{4, 5} &&
           seqs("vol3") == std::vector<uint64_t>{4, 5};
  });
  VerifyAllPoints(*src, 3);
  VolumeConfig bad = Config();
  bad.id = "vol4";
  bad.image = "other2";
  bad.target_image = "bad-standby";
  bad.retention = RetentionRules{2, {RetentionTier{0, false, 3}}};  // a zero period
  SourceReplicator bad_rep(bad, "a", site_a_, Connector());
  auto refused = bad_rep.RunOnce();
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("the source's retention rules"));
  EXPECT_FALSE(site_b_->Exists("bad-standby").value()) << "a refused source wrote the sink";
}

// A restore holds its point against retention until its copy is made:
// points made meanwhile (with keep_points 1) do not take it away midway.
TEST_F(ReplicationTest, ARestoreHoldsItsPointWhileItCopies) {
  SinkEnv env = sink_env_;
  env.keep_points = 1;
  RestartSink(env);
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(82);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  ASSERT_TRUE(rep.RunOnce().ok());
  const std::string want = testing::ImageHash(*src, SnapName(1), kMiB);
  // As the copy starts, two more points are made: retention would keep
  // only the newest.
  bool ran = false;
  fault_b_->SetFault([&](const VolumeFaultPoint& f) -> Status {
    if (f.op != VolumeOp::kCopy || ran) return OkStatus();
    ran = true;
    for (int i = 0; i < 2; ++i) {
      testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
      if (auto r = rep.RunOnce(); !r.ok()) return r.status();
    }
    return OkStatus();
  });
  auto restored = sink_->Restore("vol1", 1, "img-restored", /*full=*/true, nullptr);
  fault_b_->SetFault(nullptr);
  ASSERT_TRUE(ran);
  ASSERT_TRUE(restored.ok()) << restored.status().ToString();
  EXPECT_EQ(testing::ImageHash(*testing::MustOpen(*site_b_, "img-restored"), "", kMiB), want);
  // Released: the next pass lets it go.
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  ASSERT_TRUE(rep.RunOnce().ok());
  PollUntil("retention keeping only the newest point", [&] {
    const std::vector<RestorePoint> points = sink_->Points("vol1").value();
    return points.size() == 1 && points[0].epoch.seq == 4;
  });
}

}  // namespace
}  // namespace cairn
