// The real source and sink code, end to end over the in-process link and
// in-memory volumes: several epochs with writes between them, and every
// restore point compared by content with the source snapshot it stands for.
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include "engine/base/clock.h"
#include "engine/link/codec_link.h"
#include "engine/link/fault_link.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/file_spool_store.h"
#include "engine/volume/fault_pool.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/replication/replication_fixture.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;

TEST_F(ReplicationTest, FiveEpochsEveryPointEqualsItsSourceSnapshot) {
  const uint64_t size = 8 * kMiB + 4097;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(11);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  for (int i = 1; i <= 6; ++i) {
    testing::RandomChanges(*src, rng, size, 25);
    auto sum = rep.RunOnce();
    ASSERT_TRUE(sum.ok()) << "epoch " << i << ": " << sum.status().ToString();
    EXPECT_EQ(sum->id.seq, static_cast<uint64_t>(i));
  }
  VerifyAllPoints(*src, 6);
  EXPECT_EQ(rep.Report().last_seq, 6u);
  EXPECT_EQ(rep.Report().epochs_total, 6u);

  // Restore: clone and full copy equal the point.
  auto pts = *sink_->Points("vol1");
  auto r = sink_->Restore("vol1", 3, "restored-3", false, nullptr);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  auto full = sink_->Restore("vol1", 0, "restored-latest", true, nullptr);
  ASSERT_TRUE(full.ok()) << full.status().ToString();
  EXPECT_EQ(full->point.epoch.seq, 6u);
  EXPECT_EQ(
      testing::ImageHash(*testing::MustOpen(*site_b_, "restored-3"), "", pts[2].epoch.image_size),
      testing::ImageHash(*src, "cairn.3", pts[2].epoch.image_size));
  EXPECT_EQ(testing::ImageHash(*testing::MustOpen(*site_b_, "restored-latest"), "",
                               pts[5].epoch.image_size),
            testing::ImageHash(*src, "cairn.6", pts[5].epoch.image_size));
  auto again = sink_->Restore("vol1", 3, "restored-3", false, nullptr);
  EXPECT_EQ(again.status().code(), Code::kAlreadyExists);
  EXPECT_EQ(sink_->Restore("vol1", 99, "x", false, nullptr).status().message(),
            "volume vol1 has no restore point 99");
}

TEST_F(ReplicationTest, SourceRestartResumesFromTheSinksNewestPoint) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(12);
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    testing::RandomChanges(*src, rng, size, 10);
    ASSERT_TRUE(rep.RunOnce().ok());
    testing::RandomChanges(*src, rng, size, 10);
    ASSERT_TRUE(rep.RunOnce().ok());
  }
  // A snapshot taken but never shipped (the source died right after it).
  ASSERT_TRUE(src->CreateSnap("cairn.3").ok());
  testing::RandomChanges(*src, rng, size, 10);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  auto sum = rep.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 3u);       // the pending snapshot, not a new one
  EXPECT_EQ(sum->id.base_seq, 2u);  // an increment, not a full resend
  ASSERT_TRUE(rep.RunOnce().ok());
  VerifyAllPoints(*src, 4);
}

// A restarted source that cannot ship (its image is gone) still reports the
// newest point the sink holds, and its time: the lag counts from that point,
// not from nothing.
TEST_F(ReplicationTest, RestartedSourceReportsTheSinksNewestPointAndItsTime) {
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  int64_t point_time = 0;
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    ASSERT_TRUE(rep.RunOnce().ok());
    point_time = rep.Report().last_point_time_ns;
    ASSERT_GT(point_time, 0);
  }
  ASSERT_TRUE(site_a_->Remove("img").ok());
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  EXPECT_FALSE(rep.RunOnce().ok());
  const VolumeStatusInfo s = rep.Report();
  EXPECT_EQ(s.last_seq, 1u);
  EXPECT_EQ(s.last_point_time_ns, point_time);
  EXPECT_GE(s.lag_seconds, 0);
}

TEST_F(ReplicationTest, CorruptFrameIsRefusedCountedAndResent) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(13);
  testing::Write(*src, 0, testing::RandomBytes(rng, 2 * kMiB));
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  flip_next_ = 3;
  auto bad = rep.RunOnce();
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Code::kDataLoss) << bad.status().ToString();
  EXPECT_THAT(bad.status().message(), HasSubstr("block checksum mismatch"));
  EXPECT_EQ(sink_->corrupt_frames(), 1u);
  EXPECT_FALSE(site_b_->Exists("img-standby").value() &&
               sink_->Points("vol1").ok());  // nothing applied
  auto good = rep.RunOnce();
  ASSERT_TRUE(good.ok()) << good.status().ToString();
  EXPECT_EQ(good->id.seq, 1u);  // the same epoch, sent again
  VerifyAllPoints(*src, 1);
}

// Compressed records (codec_link.h) make the same points, and a bit
// flipped in one on the wire is refused like any damaged frame: nothing of
// its epoch is applied, and the epoch is sent again.
TEST_F(ReplicationTest, CompressedRecordsMakeTheSamePointsAndADamagedOneIsSentAgain) {
  for (Compression codec : {Compression::kLz4, Compression::kZstd}) {
    SCOPED_TRACE(std::string(CompressionName(codec)));
    const std::string img = "img-" + std::string(CompressionName(codec));
    const uint64_t size = 6 * kMiB;
    ASSERT_TRUE(site_a_->Create(img, size).ok());
    auto src = testing::MustOpen(*site_a_, img);
    std::mt19937_64 rng(17);
    std::string text;
    while (text.size() < 3 * kMiB) text += "restore point " + std::to_string(rng() % 1000) + "\n";
    testing::Write(*src, 0, text.substr(0, 3 * kMiB));
    testing::Write(*src, 4 * kMiB, testing::RandomBytes(rng, kMiB));
    VolumeConfig c = Config();
    c.id = "vol-" + std::string(CompressionName(codec));
    c.image = img;
    c.target_image = img + "-standby";
    c.compression = codec;
    SourceReplicator rep(c, "a", site_a_, Connector());
    const uint64_t corrupt_before = sink_->corrupt_frames();
    const int compressed_before = compressed_frames_;
    flip_next_ = 1;  // the second data record: compressed text
    auto bad = rep.RunOnce();
    ASSERT_FALSE(bad.ok());
    EXPECT_EQ(sink_->corrupt_frames(), corrupt_before + 1);
    EXPECT_FALSE(sink_->Points(c.id).ok() && !sink_->Points(c.id)->empty());
    for (int i = 1; i <= 3; ++i) {
      if (i > 1) {
        testing::Write(*src, (i * kMiB) % size, text.substr(i * 1000, 300 * 1024));
        testing::RandomChanges(*src, rng, size, 5);
      }
      auto sum = rep.RunOnce();
      ASSERT_TRUE(sum.ok()) << "epoch " << i << ": " << sum.status().ToString();
      EXPECT_EQ(sum->id.seq, static_cast<uint64_t>(i));
      VerifyAllPoints(*src, i, false, c.id, c.target_image);
    }
    EXPECT_GT(compressed_frames_, compressed_before + 3);
  }
}

TEST_F(ReplicationTest, CutMidEpochResumesFromTheSpooledPrefix) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(15);
  testing::Write(*src, 0, testing::RandomBytes(rng, 3 * kMiB));  // 12 records of 256 KiB
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  cut_at_frame_ = 7;
  auto cut = rep.RunOnce();
  ASSERT_FALSE(cut.ok());
  EXPECT_EQ(cut.status().code(), Code::kAborted) << cut.status().ToString();
  auto resumed = rep.RunOnce();
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->id.seq, 1u);
  EXPECT_EQ(resumed->records, 12u);
  EXPECT_EQ(*sent_records_, 12 - 7);  // only what the sink did not hold
  VerifyAllPoints(*src, 1);
}

TEST_F(ReplicationTest, RecordsReachTheStandbyHeadWhileTheEpochArrives) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(21);
  const std::string data = testing::RandomBytes(rng, 3 * kMiB);  // 12 records of 256 KiB
  testing::Write(*src, 0, data);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  cut_at_frame_ = 7;
  ASSERT_FALSE(rep.RunOnce().ok());
  for (auto& t : sessions_) t.join();  // the sink's session has ended
  sessions_.clear();
  // No restore point, but the head already holds the records that arrived.
  auto pts = sink_->Points("vol1");
  EXPECT_TRUE(pts.ok() ? pts->empty() : pts.status().code() == Code::kNotFound)
      << pts.status().ToString();
  auto head = testing::MustOpen(*site_b_, "img-standby");
  EXPECT_EQ(testing::ImageHash(*head, "", kMiB),
            testing::ImageHash(*src, "", kMiB));  // records 0-3 of 7 delivered
}

TEST_F(ReplicationTest, ACutFirstEpochReplannedFromAnotherSnapshotLeavesNothingStale) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(22);
  testing::Write(*src, 0, testing::RandomBytes(rng, 3 * kMiB));
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    cut_at_frame_ = 7;  // 7 records written to the standby head, no point
    ASSERT_FALSE(rep.RunOnce().ok());
  }
  // The sink loses its spool and the source its snapshot (both crashed
  // with their disks), and the guest discards the first MiB: the next
  // first epoch does not list it at all.
  for (auto& t : sessions_) t.join();
  sessions_.clear();
  std::filesystem::remove_all(spool_);
  RestartSink(sink_env_);
  ASSERT_TRUE(src->RemoveSnap("cairn.1").ok());
  testing::Zero(*src, 0, kMiB);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  auto sum = rep.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.base_seq, 0u);
  VerifyAllPoints(*src, 1);  // the first MiB reads as zeros at site B too
}

// The cairn.<N> seqs that exist on `vol`, ascending.
std::vector<uint64_t> CairnSnaps(Volume& vol) {
  std::vector<uint64_t> out;
  const auto snaps = vol.ListSnaps().value();
  for (const auto& s : snaps) {
    if (auto seq = ParseSnapName(s.name)) out.push_back(*seq);
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST_F(ReplicationTest, RetentionKeepsTheNewestPointsAndTheirSnapshotsOnly) {
  SinkEnv env = sink_env_;
  env.keep_points = 2;
  RestartSink(env);
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(23);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  for (int i = 0; i < 5; ++i) {
    testing::Write(*src, (i * 300 * 1024) % size, testing::RandomBytes(rng, 64 * 1024));
    auto sum = rep.RunOnce();
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  }
  // Retention runs after the APPLIED ack, so it may still be at work when
  // RunOnce returns.
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  PollUntil("retention keeping points 4 and 5 and their snapshots only", [&] {
    return sink_->Points("vol1")->front().epoch.seq == 4 &&
           CairnSnaps(*dst) == std::vector<uint64_t>{4, 5};
  });
  VerifyAllPoints(*src, 2);
  // A stray snapshot of a pass cut between catalog and snapshot goes next time.
  ASSERT_TRUE(dst->CreateSnap("cairn.3").ok());
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  ASSERT_TRUE(rep.RunOnce().ok());
  PollUntil("retention removing the stray cairn.3 and point 4", [&] {
    return CairnSnaps(*dst) == std::vector<uint64_t>{5, 6};
  });
  VerifyAllPoints(*src, 2);
}

// With the next epoch due as one ends (here: a point is asked for while
// each epoch is sent), the source removes older snapshots and takes the
// next one while the sink works on the current epoch; the next epoch ships
// that snapshot, and a fresh source ships one left behind. Nothing is
// skipped, orphaned or pruned too early.
TEST_F(ReplicationTest, BehindScheduleTheNextSnapshotIsTakenAheadAndShipped) {
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(31);
  VolumeConfig c = Config();
  c.keep_snapshots = 0;
  std::map<uint64_t, std::string> want;  // seq -> hash of cairn.<seq>
  {
    SourceReplicator rep(c, "a", site_a_, Connector());
    on_epoch_end_ = [&rep] { ASSERT_TRUE(rep.RequestNow().ok()); };
    for (uint64_t seq = 1; seq <= 3; ++seq) {
      testing::Write(*src, (seq * 200 * 1024) % size, testing::RandomBytes(rng, 64 * 1024));
      auto sum = rep.RunOnce();
      ASSERT_TRUE(sum.ok()) << sum.status().ToString();
      EXPECT_EQ(sum->id.seq, seq);
      want[seq] = testing::ImageHash(*src, SnapName(seq), size);
      // cairn.<seq+1> was taken while the sink applied epoch seq.
      EXPECT_EQ(CairnSnaps(*src), (seq == 1 ? std::vector<uint64_t>{1, 2}
                                            : std::vector<uint64_t>{seq - 1, seq, seq + 1}))
          << "after epoch " << seq;
      EXPECT_EQ(rep.Report().pending_snapshots, 1u) << "after epoch " << seq;
      want[seq + 1] = testing::ImageHash(*src, SnapName(seq + 1), size);
    }
    // cairn.2 was taken before the second write, cairn.3 after it.
    EXPECT_EQ(want[1], want[2]);
    EXPECT_NE(want[2], want[3]);
    EXPECT_EQ(rep.Report().last_seq, 3u);
  }
  // cairn.4 was taken ahead and never shipped: a restarted source ships it.
  on_epoch_end_ = nullptr;
  SourceReplicator fresh(Config(), "a", site_a_, Connector());
  auto sum = fresh.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 4u);
  auto pts = sink_->Points("vol1");
  ASSERT_TRUE(pts.ok()) << pts.status().ToString();
  ASSERT_EQ(pts->size(), 4u);
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  for (const auto& p : *pts) {
    EXPECT_EQ(testing::ImageHash(*dst, p.snap, p.epoch.image_size), want[p.epoch.seq])
        << "point " << p.epoch.seq;
  }
}

TEST_F(ReplicationTest, BehindScheduleSnapshotsStayAnIntervalApart) {
  // Epochs that take longer than the interval, though their data is sent
  // sooner: the helper takes each next snapshot once the send is through
  // and an interval has passed since the one before, and it ships at once.
  UseManualClock();
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(33);
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  VolumeConfig c = Config();
  c.interval = std::chrono::seconds(10);
  // A slow standby: each ack (durable, applied) leaves 6 s later on the
  // clock than the one before. A guest writes meanwhile: an unchanged
  // image would take no snapshot.
  auto guest = testing::MustOpen(*site_a_, "img");
  uint64_t writes = 0;
  on_ack_ = [&] {
    clock_.Advance(std::chrono::seconds(6));
    testing::Write(*guest, (writes++ % 16) * 4096, testing::RandomBytes(rng, 4096));
  };
  SourceReplicator rep(c, "a", site_a_, Connector());
  rep.set_clock(clock_);
  rep.Start();
  PollUntil("six restore points", [&] { return rep.Report().last_seq >= 6; });
  rep.Stop();
  for (auto& t : sessions_) t.join();  // none is left in on_ack_, which uses guest
  sessions_.clear();
  std::vector<int64_t> times;  // of cairn.1, cairn.2, ... in order
  const auto snaps = src->ListSnaps();
  ASSERT_TRUE(snaps.ok()) << snaps.status().ToString();
  for (const auto& s : *snaps) {
    if (ParseSnapName(s.name)) times.push_back(s.time_ns);
  }
  ASSERT_GE(times.size(), 6u);
  // Each epoch takes 12 s (two acks): the next snapshot is due 10 s after
  // its own and is taken as the last ack comes, never sooner, and the
  // epoch it is shipped by starts at once.
  for (size_t i = 1; i < times.size(); ++i) {
    EXPECT_EQ(times[i] - times[i - 1], 12'000'000'000)
        << "cairn." << i << " and cairn." << i + 1 << " not one epoch apart";
  }
  // Every point the sink made (the last may have been made as the source
  // stopped) equals its source snapshot.
  VerifyAllPoints(*src, 6, /*at_least=*/true);
}

TEST_F(ReplicationTest, AnIdleVolumeTakesNoSnapshotAndMakesNoPoint) {
  UseManualClock();
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(41);
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  VolumeConfig c = Config();
  c.interval = std::chrono::seconds(10);
  SourceReplicator rep(c, "a", site_a_, Connector());
  rep.set_clock(clock_);
  rep.Start();
  PollUntil("the first restore point", [&] { return rep.Report().last_seq >= 1; });
  const uint64_t first = rep.Report().last_seq;
  for (uint64_t i = 1; i <= 20; ++i) {
    ASSERT_TRUE(AdvanceWhenParked(c.interval));
    PollUntil(fmt::format("due check {} skipped, the image unchanged", i),
              [&] { return rep.Report().unchanged_checks_total >= i; });
  }
  EXPECT_EQ(rep.Report().last_seq, first) << "a point made of an unchanged image";
  EXPECT_EQ(CairnSnaps(*src).back(), first) << "a snapshot taken of an unchanged image";
  // The lag counts from the last check (200 s after the point's
  // snapshot), at the standby too: the source tells it of each check.
  EXPECT_EQ(rep.Report().lag_seconds, 0.0);
  PollUntil("the sink told of 20 checks", [&] {
    const auto st = sink_->Report();
    return st.size() == 1 && st[0].unchanged_checks_total >= 20;
  });
  const auto at_sink = sink_->Report()[0];
  EXPECT_EQ(at_sink.last_seq, first);
  EXPECT_EQ(at_sink.unchanged_as_of_ns - at_sink.last_point_time_ns, 200'000'000'000);
  EXPECT_EQ(at_sink.lag_seconds, 0.0);
  testing::Write(*src, kMiB, testing::RandomBytes(rng, 4096));
  ASSERT_TRUE(AdvanceWhenParked(c.interval));
  PollUntil("a point after the write", [&] { return rep.Report().last_seq > first; });
  const uint64_t second = rep.Report().last_seq;
  const uint64_t checks = rep.Report().unchanged_checks_total;
  for (uint64_t i = 1; i <= 10; ++i) {
    ASSERT_TRUE(AdvanceWhenParked(c.interval));
    PollUntil("idle again", [&] { return rep.Report().unchanged_checks_total >= checks + i; });
  }
  rep.Stop();
  EXPECT_EQ(rep.Report().last_seq, second);
  VerifyAllPoints(*src, second, /*at_least=*/false);
}

TEST_F(ReplicationTest, BackToBackTheOlderSnapshotsGoWhileTheNextEpochIsSent) {
  // Removing a snapshot waits on the guest: epochs that run back to back
  // remove the older ones beside the send, not before the next point.
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(32);
  VolumeConfig c = Config();
  c.keep_snapshots = 0;
  SourceReplicator rep(c, "a", site_a_, Connector());
  uint64_t sending = 0;
  std::vector<uint64_t> at_epoch_end;  // the source's snapshots as epoch 3 ends its send
  on_epoch_end_ = [&] {
    if (sending == 3) {
      // The epoch's last frame waits here until the helper has removed
      // cairn.1: a source that removed it only after the send hangs, and
      // the wait fails.
      PollUntil("cairn.1 removed while epoch 3 was being sent",
                [&] { return CairnSnaps(*src).front() == 2; });
      at_epoch_end = CairnSnaps(*src);
    }
    ASSERT_TRUE(rep.RequestNow().ok());  // the next epoch is due at once
  };
  for (sending = 1; sending <= 3; ++sending) {
    testing::Write(*src, (sending * 300 * 1024) % size, testing::RandomBytes(rng, 64 * 1024));
    auto sum = rep.RunOnce();
    ASSERT_TRUE(sum.ok()) << sum.status().ToString();
    EXPECT_EQ(sum->id.seq, sending);
  }
  // cairn.2 (the base) and cairn.3 (being sent) stayed; cairn.4 was taken
  // once the send was through.
  EXPECT_EQ(at_epoch_end, (std::vector<uint64_t>{2, 3}));
  EXPECT_EQ(CairnSnaps(*src), (std::vector<uint64_t>{2, 3, 4}));
  on_epoch_end_ = nullptr;
  auto pts = sink_->Points("vol1");
  ASSERT_TRUE(pts.ok()) << pts.status().ToString();
  ASSERT_EQ(pts->size(), 3u);
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  EXPECT_EQ(testing::ImageHash(*dst, SnapName(3), size),
            testing::ImageHash(*src, SnapName(3), size));
}

TEST_F(ReplicationTest, OutageKeepsTheScheduleBoundedAndResumesTheEpochInFlight) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(16);
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  auto down = std::make_shared<std::atomic<bool>>(false);
  auto inner = Connector();
  auto connect = [down, inner]() -> StatusOr<std::unique_ptr<Link>> {
    if (down->load()) return Unavailable("sink unreachable (test)");
    return inner();
  };
  VolumeConfig c = Config();
  c.interval = std::chrono::seconds(1);
  c.outage_snapshots = 2;
  SourceReplicator rep(c, "a", site_a_, connect);
  rep.set_clock(clock_);
  ASSERT_TRUE(rep.RunOnce().ok());  // point 1
  testing::Write(*src, 0, testing::RandomBytes(rng, 3 * kMiB));
  rep.Disconnect();
  cut_at_frame_ = 5;  // epoch 2 is cut with 5 records durable at the sink
  ASSERT_FALSE(rep.RunOnce().ok());
  down->store(true);
  rep.Start();
  // The schedule goes on: snapshots keep being taken, the oldest dropped,
  // but never the base (1) nor the epoch the sink holds a prefix of (2).
  ASSERT_TRUE(AdvanceUntil("ten snapshots taken during the outage", c.interval,
                           [&] { return CairnSnaps(*src).back() >= 12; }));
  testing::RandomChanges(*src, rng, size, 10);
  const uint64_t before_heal = CairnSnaps(*src).back();
  ASSERT_TRUE(AdvanceUntil("a snapshot after the last write", c.interval,
                           [&] { return CairnSnaps(*src).back() > before_heal; }));
  auto during = CairnSnaps(*src);
  ASSERT_GE(during.size(), 3u);
  EXPECT_EQ(during[0], 1u);
  EXPECT_EQ(during[1], 2u);
  EXPECT_LE(during.size(), 2u + c.outage_snapshots + 1) << "outage snapshots are not bounded";
  EXPECT_GE(rep.Report().pending_snapshots, 2u);
  EXPECT_EQ(rep.Report().state, VolumeState::kDisconnected);
  down->store(false);
  ASSERT_TRUE(AdvanceUntil("the newest outage snapshot becoming a restore point", c.interval,
                           [&] { return rep.Report().last_seq >= during.back(); }));
  rep.Stop();
  auto pts = sink_->Points("vol1").value();
  ASSERT_GE(pts.size(), 3u);
  EXPECT_EQ(pts[1].epoch.seq, 2u);
  EXPECT_EQ(rep.Report().resumed_epochs_total, 1u) << "epoch 2 did not resume from its prefix";
  for (size_t i = 1; i < pts.size(); ++i) EXPECT_EQ(pts[i].epoch.base_seq, pts[i - 1].epoch.seq);
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  for (const auto& p : pts) {
    EXPECT_EQ(testing::ImageHash(*dst, p.snap, p.epoch.image_size),
              testing::ImageHash(*src, SnapName(p.epoch.seq), p.epoch.image_size))
        << "restore point " << p.epoch.seq;
  }
  EXPECT_EQ(testing::ImageHash(*dst, pts.back().snap, size), testing::ImageHash(*src, "", size))
      << "the newest point is not the image as it was after the last write";
}

TEST_F(ReplicationTest, PromoteFencesTheSourceAndReleaseKeepsThePromotedImage) {
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(17);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  EXPECT_EQ(sink_->Promote("vol1", 0, "", "img-b").status().code(), Code::kNotFound);
  for (int i = 0; i < 2; ++i) {
    testing::RandomChanges(*src, rng, size, 8);
    ASSERT_TRUE(rep.RunOnce().ok());
  }
  ASSERT_TRUE(site_b_->Create("taken", size).ok());
  EXPECT_EQ(sink_->Promote("vol1", 0, "", "taken").status().code(), Code::kAlreadyExists);
  EXPECT_EQ(sink_->Promote("vol1", 0, "other", "img-b").status().code(), Code::kInvalidArgument);

  auto p = sink_->Promote("vol1", 1, "", "img-b");  // an older point, on purpose
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->point.epoch.seq, 1u);
  EXPECT_FALSE(p->again);
  EXPECT_EQ(testing::ImageHash(*testing::MustOpen(*site_b_, "img-b"), "", size),
            testing::ImageHash(*src, "cairn.1", size));
  auto again = sink_->Promote("vol1", 0, "", "img-b");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_TRUE(again->again);
  EXPECT_EQ(again->point.epoch.seq, 1u);
  EXPECT_EQ(sink_->Promote("vol1", 0, "", "img-c").status().code(), Code::kFailedPrecondition);

  // Fenced: the source is refused, and nothing reaches the standby.
  testing::RandomChanges(*src, rng, size, 8);
  rep.Disconnect();
  auto refused = rep.RunOnce();
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("is failed over to site b"));
  EXPECT_EQ(sink_->Points("vol1")->size(), 2u);

  testing::Write(*testing::MustOpen(*site_b_, "img-b"), 0, "written at site b");
  auto kept = sink_->Release("vol1");
  ASSERT_TRUE(kept.ok()) << kept.status().ToString();
  EXPECT_THAT(*kept, ::testing::StartsWith("img-b.failback-"));
  EXPECT_FALSE(site_b_->Exists("img-b").value());
  // The kept image still holds what was written at site B.
  auto k = testing::MustOpen(*site_b_, *kept);
  EXPECT_NE(testing::ImageHash(*k, "", size), testing::ImageHash(*src, "cairn.1", size));
  ASSERT_TRUE(site_b_->Copy("img-standby", "cairn.1", "expect2", nullptr).ok());
  auto expect = testing::MustOpen(*site_b_, "expect2");
  testing::Write(*expect, 0, "written at site b");
  EXPECT_EQ(testing::ImageHash(*k, "", size), testing::ImageHash(*expect, "", size));
  EXPECT_EQ(sink_->Release("vol1").status().code(), Code::kFailedPrecondition);
  // Replication goes on from where it was.
  auto next = rep.RunOnce();
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->id.base_seq, 2u);
  VerifyAllPoints(*src, 3);
}

TEST_F(ReplicationTest, ARecreatedImageIsResyncedWholeOverItsOldStandby) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  std::mt19937_64 rng(18);
  {
    auto src = testing::MustOpen(*site_a_, "img");
    testing::Write(*src, 0, testing::RandomBytes(rng, size));  // all of it, at the standby too
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    ASSERT_TRUE(rep.RunOnce().ok());
  }
  // The image is deleted and made again (Cinder: a volume from a Glance
  // image), with little data: its base snapshot is gone.
  ASSERT_TRUE(site_a_->Open("img").value()->RemoveSnap("cairn.1").ok());
  ASSERT_TRUE(site_a_->Remove("img").ok());
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  testing::Write(*src, kMiB + 4096, testing::RandomBytes(rng, 8192));
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  auto sum = rep.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 2u);
  EXPECT_EQ(sum->id.base_seq, 1u);                     // the chain goes on
  EXPECT_EQ(sum->zero_bytes, size - sum->data_bytes);  // the old data is zeroed
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  EXPECT_EQ(testing::ImageHash(*dst, "cairn.2", size), testing::ImageHash(*src, "cairn.2", size));
  EXPECT_EQ(testing::ImageHash(*dst, "", size), testing::ImageHash(*src, "", size));
  // And the next epoch is an increment again.
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  auto next = rep.RunOnce();
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->id.base_seq, 2u);
  EXPECT_LE(next->data_bytes + next->zero_bytes, 256 * 1024u);
}

// The snapshot of the sink's newest point is gone at the source (removed
// by hand): the sink's point is compared with the new snapshot block by
// block (digests), and only what differs travels.
TEST_F(ReplicationTest, ALostBaseSnapshotIsResyncedByDigests) {
  const uint64_t size = 8 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  std::mt19937_64 rng(19);
  auto src = testing::MustOpen(*site_a_, "img");
  testing::Write(*src, 0, testing::RandomBytes(rng, size));
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  ASSERT_TRUE(rep.RunOnce().ok());
  ASSERT_TRUE(src->RemoveSnap("cairn.1").ok());
  testing::Write(*src, 5 * kMiB + 4096, testing::RandomBytes(rng, 4096));
  auto sum = rep.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.base_seq, 1u);
  EXPECT_EQ(sum->data_bytes, 64 * 1024u);  // the one grain that differs
  EXPECT_EQ(sum->zero_bytes, 0u);
  auto pts = sink_->Points("vol1");
  ASSERT_TRUE(pts.ok() && pts->size() == 2);
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  EXPECT_EQ(testing::ImageHash(*dst, pts->back().snap, size),
            testing::ImageHash(*src, "cairn.2", size));
  EXPECT_EQ(testing::ImageHash(*dst, "", size), testing::ImageHash(*src, "cairn.2", size));
}

TEST_F(ReplicationTest, RequestNowPromisesAPointNewerThanEverySnapshot) {
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    ASSERT_TRUE(rep.RunOnce().ok());
    ASSERT_TRUE(rep.RunOnce().ok());
  }
  // A fresh source (a restarted cairnd) has not talked to the sink yet.
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  auto promised = rep.RequestNow();
  ASSERT_TRUE(promised.ok()) << promised.status().ToString();
  EXPECT_EQ(*promised, 3u);
  auto r = rep.RunOnce();
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->id.seq, 3u);
}

// A snapshot's point in time is when its creation starts; until it is
// listed, a RequestNow must not promise its seq (the caller's writes may be
// newer than it).
TEST_F(ReplicationTest, RequestNowDuringASnapshotsCreationPromisesTheNextOne) {
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  auto fault_a = std::make_shared<FaultPool>(*site_a_);
  SourceReplicator rep(Config(), "a", fault_a, Connector());
  ASSERT_TRUE(rep.RunOnce().ok());
  uint64_t promised = 0;
  fault_a->SetFault([&](const VolumeFaultPoint& p) {
    if (p.op == VolumeOp::kCreateSnap && p.snap == "cairn.2" && promised == 0) {
      auto seq = rep.RequestNow();
      promised = seq.ok() ? *seq : 0;
    }
    return OkStatus();
  });
  auto r = rep.RunOnce();
  fault_a->SetFault(nullptr);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->id.seq, 2u);
  EXPECT_EQ(promised, 3u);
}

// A cairnd that cannot list the image's snapshots knows no safe promise
// (after a restart it has not seen the ones its predecessor took): it says
// so rather than promising a point that may miss the caller's writes.
TEST_F(ReplicationTest, RequestNowFailsWhenTheSnapshotsCannotBeListed) {
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    ASSERT_TRUE(rep.RunOnce().ok());
    ASSERT_TRUE(rep.RunOnce().ok());
  }
  auto fault_a = std::make_shared<FaultPool>(*site_a_);
  SourceReplicator rep(Config(), "a", fault_a, Connector());
  fault_a->SetFault([](const VolumeFaultPoint& p) {
    return p.op == VolumeOp::kOpen ? Unavailable("the cluster does not answer") : OkStatus();
  });
  auto promised = rep.RequestNow();
  fault_a->SetFault(nullptr);
  ASSERT_FALSE(promised.ok()) << "promised " << *promised << " without listing the snapshots";
  EXPECT_EQ(promised.status().code(), Code::kUnavailable);
  EXPECT_THAT(promised.status().message(), HasSubstr("no restore point can be promised"));
  EXPECT_THAT(promised.status().message(), HasSubstr("the cluster does not answer"));
  auto again = rep.RequestNow();
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(*again, 3u);
}

TEST(SourceReplicator, ALinkErrorWithCodeZeroIsAnErrorNotACrash) {
  auto pool = std::make_shared<MemoryPool>("rbd");
  ASSERT_TRUE(pool->Create("img", kMiB).ok());
  VolumeConfig c;
  c.id = "v";
  c.image = "img";
  c.target_pool = "rbd";
  c.target_image = "img";
  std::thread peer;
  SourceReplicator rep(c, "a", pool, [&]() -> StatusOr<std::unique_ptr<Link>> {
    auto [a, b] = MakeMemoryLinkPair();
    peer = std::thread([l = std::move(b)]() {
      (void)l->Receive(std::chrono::seconds(5));     // the Hello
      (void)l->Send(FrameType::kLinkError, "", {});  // a LinkError of code 0 (proto3: empty)
      (void)l->Receive(std::chrono::seconds(5));
    });
    return std::move(a);
  });
  auto r = rep.RunOnce();
  rep.Disconnect();
  peer.join();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInternal) << r.status().ToString();
  EXPECT_THAT(r.status().message(), HasSubstr("invalid code 0"));
}

TEST_F(ReplicationTest, SinkRefusesAnImageItDidNotCreate) {
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  ASSERT_TRUE(site_b_->Create("img-standby", kMiB).ok());  // someone else's
  testing::Write(*testing::MustOpen(*site_b_, "img-standby"), 0, "precious");
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  auto r = rep.RunOnce();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("was not created by Cairn"));
  auto standby = testing::MustOpen(*site_b_, "img-standby");
  auto io = standby->OpenIo("");
  std::string buf(8, '\0');
  ASSERT_TRUE((*io)->StartRead(0, 0, std::span<char>(buf.data(), 8)).ok());
  ASSERT_TRUE((*io)->WaitOne().status.ok());
  EXPECT_EQ(buf, "precious");
}

TEST_F(ReplicationTest, StandbyRemovedOutsideCairnIsNotRefilledWithADelta) {
  ASSERT_TRUE(site_a_->Create("img", 2 * kMiB).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(14);
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  ASSERT_TRUE(rep.RunOnce().ok());
  ASSERT_TRUE(site_b_->Remove("img-standby").ok());  // an operator's mistake
  testing::Write(*src, 0, "x");
  auto r = rep.RunOnce();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("standby image rbd/img-standby is gone"));
  EXPECT_FALSE(*site_b_->Exists("img-standby"));
  EXPECT_EQ(sink_->Points("vol1")->size(), 1u);
}

TEST_F(ReplicationTest, UnservedPoolIsAClearError) {
  ASSERT_TRUE(site_a_->Create("img", kMiB).ok());
  VolumeConfig c = Config();
  c.target_pool = "volumes";
  SourceReplicator rep(c, "a", site_a_, Connector());
  auto r = rep.RunOnce();
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(),
              HasSubstr("pool 'volumes' is not served by this sink: add it to [sink] pools"));
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

// Every operation on the standby pool fails as a cluster that does not
// answer does (RADOS op timeout), while *down is true.
void StandbyDown(FaultPool& pool, std::shared_ptr<std::atomic<bool>> down) {
  pool.SetFault([down](const VolumeFaultPoint&) {
    return down->load() ? Unavailable("Connection timed out (errno 110)") : OkStatus();
  });
}

TEST_F(ReplicationTest, StandbyClusterDownTheSinkAppliesTheDurableEpochByItself) {
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(21);
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  auto down = std::make_shared<std::atomic<bool>>(false);
  StandbyDown(*fault_b_, down);
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    ASSERT_TRUE(rep.RunOnce().ok());  // point 1
    testing::Write(*src, kMiB / 2, testing::RandomBytes(rng, kMiB));
    down->store(true);
    auto r = rep.RunOnce();
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), Code::kUnavailable) << r.status().ToString();
    EXPECT_THAT(r.status().message(),
                HasSubstr("sink: the standby Ceph cluster of site b is unreachable: applying "
                          "epoch 2: "));
    EXPECT_THAT(r.status().message(),
                HasSubstr("; epoch 2 is durable in the spool and the sink applies it by itself "
                          "as soon as it can (retrying with backoff)"));
    auto st = sink_->Report();
    ASSERT_EQ(st.size(), 1u);
    EXPECT_EQ(st[0].state, VolumeState::kError);
    EXPECT_THAT(st[0].error, HasSubstr("the standby Ceph cluster of site b is unreachable"));
    EXPECT_TRUE(std::filesystem::exists(spool_ / "vol1" / "2.spool"));
  }  // the source is gone for good
  down->store(false);
  PollUntil("the sink applying epoch 2 by itself", [&] {
    auto pts = sink_->Points("vol1");
    return pts.ok() && pts->size() == 2;
  });
  VerifyAllPoints(*src, 2);
  PollUntil("the sink's status clearing", [&] { return sink_->Report()[0].error.empty(); });
  auto st = sink_->Report();
  EXPECT_EQ(st[0].state, VolumeState::kDisconnected);
  EXPECT_EQ(st[0].last_seq, 2u);
  EXPECT_FALSE(std::filesystem::exists(spool_ / "vol1" / "2.spool"));
}

TEST_F(ReplicationTest, RestartedSinkAppliesTheCompleteSpoolItFindsWithoutItsSource) {
  const uint64_t size = 2 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(22);
  testing::Write(*src, 0, testing::RandomBytes(rng, kMiB));
  auto down = std::make_shared<std::atomic<bool>>(false);
  StandbyDown(*fault_b_, down);
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    ASSERT_TRUE(rep.RunOnce().ok());
    testing::Write(*src, kMiB, testing::RandomBytes(rng, kMiB / 2));
    down->store(true);
    ASSERT_FALSE(rep.RunOnce().ok());
  }
  RestartSink(sink_env_);  // still down: it keeps the spool and retries
  EXPECT_TRUE(std::filesystem::exists(spool_ / "vol1" / "2.spool"));
  EXPECT_EQ(sink_->Points("vol1")->size(), 1u);
  down->store(false);
  PollUntil("the restarted sink applying epoch 2 by itself", [&] {
    auto pts = sink_->Points("vol1");
    return pts.ok() && pts->size() == 2;
  });
  VerifyAllPoints(*src, 2);
}

TEST_F(ReplicationTest, SpoolQuotaRefusesTheEpochAndTheSourceResumesOnceRaised) {
  const uint64_t size = 4 * kMiB;
  ASSERT_TRUE(site_a_->Create("img", size).ok());
  auto src = testing::MustOpen(*site_a_, "img");
  std::mt19937_64 rng(23);
  testing::Write(*src, 0, testing::RandomBytes(rng, 3 * kMiB));  // 12 records of 256 KiB
  SinkEnv env = sink_env_;
  env.spool.max_bytes = kMiB;
  RestartSink(env);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  auto r = rep.RunOnce();
  ASSERT_FALSE(r.ok());
  const std::string refused = fmt::format(
      "spool quota exceeded: spool {} would grow to {} bytes, over the limit of 1048576 bytes; "
      "raise [sink] spool_max_bytes and restart cairnd; 3 verified records of epoch 1 are kept, "
      "the source resumes after them",
      (spool_ / "vol1" / "1.spool").string(), 1056768);
  // The sink's LinkError, or, if the source was still sending when the sink
  // closed the link, the cut (a source reads the error only after its sends).
  if (r.status().code() != Code::kAborted) {
    EXPECT_EQ(r.status().ToString(), "ResourceExhausted: sink: " + refused);
  }
  EXPECT_EQ(sink_->Report()[0].state, VolumeState::kError);
  EXPECT_EQ(sink_->Report()[0].error, "ResourceExhausted: " + refused);
  // Tried again at once: refused at the Hello, with the same reason.
  auto again = rep.RunOnce();
  EXPECT_EQ(again.status().code(), Code::kResourceExhausted);
  EXPECT_THAT(again.status().message(), HasSubstr("sink refused: " + refused));
  EXPECT_LE(std::filesystem::file_size(spool_ / "vol1" / "1.spool"), kMiB);
  env.spool.max_bytes = 64 * kMiB;
  RestartSink(env);
  auto resumed = rep.RunOnce();
  ASSERT_TRUE(resumed.ok()) << resumed.status().ToString();
  EXPECT_EQ(resumed->id.seq, 1u);
  EXPECT_EQ(*sent_records_, 12 - 3);  // only what the sink did not hold
  VerifyAllPoints(*src, 1);
}

}  // namespace
}  // namespace cairn
