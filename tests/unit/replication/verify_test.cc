// cairn verify and its repair, on the real source and sink over in-process
// links: a point is compared with its source snapshot by block digests,
// the sink records the verdict, a rotten block is found by its offset and
// repaired by a point that carries only that block, and a source that lies
// about what it compared records nothing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <thread>

#include "engine/epoch/block_digests.h"
#include "proto/cairn.pb.h"
#include "tests/unit/replication/replication_fixture.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;

class VerifyTest : public ReplicationTest {
 protected:
  // Starts a verify and waits for its end; returns what the status says.
  VerifyStatusInfo VerifyAndWait(SourceReplicator& rep, uint64_t seq, bool repair = false) {
    auto id = rep.StartVerify(seq, repair);
    EXPECT_TRUE(id.ok()) << id.status().ToString();
    PollUntil("the verify's end", [&] { return !rep.Report().verify.running; });
    return rep.Report().verify;
  }

  // A 4 MiB image with 3 MiB of random data, replicated as points 1 and 2.
  void TwoPoints(SourceReplicator& rep, std::mt19937_64& rng) {
    ASSERT_TRUE(site_a_->Create("img", size_).ok());
    auto src = testing::MustOpen(*site_a_, "img");
    testing::Write(*src, 0, testing::RandomBytes(rng, 3 * kMiB));
    ASSERT_TRUE(rep.RunOnce().ok());
    testing::Write(*src, 2 * kMiB, testing::RandomBytes(rng, 256 * 1024));
    ASSERT_TRUE(rep.RunOnce().ok());
  }

  const uint64_t size_ = 4 * kMiB;
};

TEST_F(VerifyTest, APointEqualToItsSourceIsVerifiedAndTheVerdictRecorded) {
  std::mt19937_64 rng(61);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  TwoPoints(rep, rng);
  const VerifyStatusInfo v = VerifyAndWait(rep, 0);
  EXPECT_TRUE(v.error.empty()) << v.error;
  EXPECT_EQ(v.seq, 2u);  // 0: the newest
  EXPECT_EQ(v.done_bytes, size_);
  EXPECT_EQ(v.total_bytes, size_);
  EXPECT_EQ(v.mismatched_grains, 0u);
  EXPECT_TRUE(v.mismatches.empty());
  auto pts = sink_->Points("vol1");
  ASSERT_TRUE(pts.ok());
  ASSERT_EQ(pts->size(), 2u);
  EXPECT_FALSE((*pts)[0].verification.has_value());
  ASSERT_TRUE((*pts)[1].verification.has_value());
  EXPECT_EQ((*pts)[1].verification->mismatched_grains, 0u);
  EXPECT_EQ((*pts)[1].verification->compared_bytes, size_);
  EXPECT_GT((*pts)[1].verification->recorded_ns, 0);
  // An older point whose source snapshot is kept verifies as well.
  EXPECT_EQ(VerifyAndWait(rep, 1).mismatched_grains, 0u);
}

TEST_F(VerifyTest, ARottenBlockAtTheSinkIsFoundAndRepairedByOnlyThatBlock) {
  std::mt19937_64 rng(62);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  TwoPoints(rep, rng);
  // The byte rots where point 2's snapshot and the standby head share it.
  const uint64_t rotten = 1 * kMiB + 70000;
  const Status rot = site_b_->RotByte("img-standby", "cairn.2", rotten);
  ASSERT_TRUE(rot.ok()) << rot.ToString();

  const VerifyStatusInfo v = VerifyAndWait(rep, 2, /*repair=*/true);
  EXPECT_TRUE(v.error.empty()) << v.error;
  EXPECT_EQ(v.mismatched_grains, 1u);
  ASSERT_EQ(v.mismatches.size(), 1u);
  EXPECT_EQ(v.mismatches[0].offset, rotten / kDigestGrain * kDigestGrain);
  EXPECT_EQ(v.mismatches[0].length, kDigestGrain);
  EXPECT_TRUE(v.repair);
  EXPECT_EQ(v.repaired_seq, 0u);  // the repair is the next epoch's
  auto bad = sink_->Points("vol1");
  ASSERT_TRUE(bad.ok());
  ASSERT_TRUE(bad->back().verification.has_value());
  EXPECT_EQ(bad->back().verification->mismatched_grains, 1u);

  // A point known to differ is not restored unless forced.
  auto refused = sink_->Restore("vol1", 2, "restored-2", false, nullptr);
  EXPECT_EQ(refused.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("differs from its source in 1 grains"));
  EXPECT_TRUE(sink_->Restore("vol1", 2, "restored-2", false, nullptr, /*force=*/true).ok());

  // The repair: the next epoch sends the one grain that differs, nothing else.
  auto sum = rep.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 3u);
  EXPECT_EQ(sum->data_bytes, kDigestGrain);
  EXPECT_EQ(sum->zero_bytes, 0u);
  EXPECT_EQ(rep.Report().verify.repaired_seq, 3u);
  auto src = testing::MustOpen(*site_a_, "img");
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  EXPECT_EQ(testing::ImageHash(*dst, "cairn.3", size_), testing::ImageHash(*src, "cairn.3", size_));
  EXPECT_EQ(VerifyAndWait(rep, 3).mismatched_grains, 0u);
  // The next epoch is a plain delta again.
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  auto next = rep.RunOnce();
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_LE(next->data_bytes, Config().block_size);
}

TEST_F(VerifyTest, APointWhoseSourceSnapshotIsGoneCannotBeVerified) {
  std::mt19937_64 rng(63);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  TwoPoints(rep, rng);
  ASSERT_TRUE(testing::MustOpen(*site_a_, "img")->RemoveSnap("cairn.1").ok());
  const VerifyStatusInfo v = VerifyAndWait(rep, 1);
  EXPECT_THAT(v.error, HasSubstr("has no snapshot cairn.1 any more"));
  EXPECT_FALSE((*sink_->Points("vol1"))[0].verification.has_value());
  auto none = rep.StartVerify(7, false);
  ASSERT_TRUE(none.ok());
  PollUntil("the verify's end", [&] { return !rep.Report().verify.running; });
  EXPECT_THAT(rep.Report().verify.error, HasSubstr("cairn.7"));
}

// The standby lost the snapshot of its newest point (removed by hand): the
// point is forgotten and the next epoch is a delta from the point before.
TEST_F(VerifyTest, APointWhoseSnapshotIsGoneAtTheSinkIsForgottenAndTheOneBeforeIsTheBase) {
  std::mt19937_64 rng(65);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  TwoPoints(rep, rng);
  ASSERT_TRUE(testing::MustOpen(*site_b_, "img-standby")->RemoveSnap("cairn.2").ok());
  auto src = testing::MustOpen(*site_a_, "img");
  testing::Write(*src, 0, testing::RandomBytes(rng, 4096));
  rep.Disconnect();  // a new session: the sink looks at its points then
  // The source still has cairn.2: it ships it again, as a delta from 1.
  auto again = rep.RunOnce();
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ(again->id.seq, 2u);
  EXPECT_EQ(again->id.base_seq, 1u);
  EXPECT_EQ(again->data_bytes, 256 * 1024u);  // point 2's own delta, not the image
  auto next = rep.RunOnce();
  ASSERT_TRUE(next.ok()) << next.status().ToString();
  EXPECT_EQ(next->id.base_seq, 2u);
  std::vector<uint64_t> seqs;
  const std::vector<RestorePoint> points = sink_->Points("vol1").value();
  for (const auto& p : points) seqs.push_back(p.epoch.seq);
  EXPECT_EQ(seqs, (std::vector<uint64_t>{1, 2, 3}));
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  for (const char* snap : {"cairn.2", "cairn.3"}) {
    EXPECT_EQ(testing::ImageHash(*dst, snap, size_), testing::ImageHash(*src, snap, size_)) << snap;
  }
}

// Every point's snapshot is gone at the standby: the head is kept as a
// resync base and compared by digests: only what differs is sent.
TEST_F(VerifyTest, NoPointLeftAtTheSinkResyncsByDigestsAgainstItsHead) {
  std::mt19937_64 rng(66);
  SourceReplicator rep(Config(), "a", site_a_, Connector());
  TwoPoints(rep, rng);
  {
    auto dst = testing::MustOpen(*site_b_, "img-standby");
    ASSERT_TRUE(dst->RemoveSnap("cairn.1").ok());
    ASSERT_TRUE(dst->RemoveSnap("cairn.2").ok());
  }
  auto src = testing::MustOpen(*site_a_, "img");
  testing::Write(*src, 3 * kMiB, testing::RandomBytes(rng, 4096));
  rep.Disconnect();
  // The source ships its snapshots again from cairn.1, the first compared
  // by digests with the head (which holds point 2): only the 256 KiB where
  // they differ travel, not the 3 MiB of data.
  auto sum = rep.RunOnce();
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(sum->id.seq, 1u);
  EXPECT_EQ(sum->id.base_seq, 0u);
  EXPECT_EQ(sum->data_bytes, 256 * 1024u);
  EXPECT_EQ(sum->zero_bytes, 0u);
  for (uint64_t seq = 2; seq <= 3; ++seq) {
    auto next = rep.RunOnce();
    ASSERT_TRUE(next.ok()) << next.status().ToString();
    EXPECT_EQ(next->id.seq, seq);
    EXPECT_LE(next->data_bytes, Config().block_size);
  }
  auto dst = testing::MustOpen(*site_b_, "img-standby");
  EXPECT_EQ(testing::ImageHash(*dst, "cairn.3", size_), testing::ImageHash(*src, "cairn.3", size_));
}

TEST_F(VerifyTest, ASourceThatEndsAVerifyEarlyHasNothingRecorded) {
  std::mt19937_64 rng(64);
  {
    SourceReplicator rep(Config(), "a", site_a_, Connector());
    TwoPoints(rep, rng);
  }
  auto [ours, theirs] = MakeMemoryLinkPair(1u << 20);
  std::thread serve([&, l = std::move(theirs)]() mutable { (void)sink_->Serve(*l); });
  pb::Hello hello;
  hello.set_protocol_version(kProtocolVersion);
  hello.set_volume("vol1");
  hello.set_pool("rbd");
  hello.set_image("img-standby");
  hello.set_source_site("a");
  hello.set_verify_seq(2);
  ASSERT_TRUE(ours->Send(FrameType::kHello, hello.SerializeAsString(), {}).ok());
  auto reply = ours->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(reply.ok());
  ASSERT_EQ(reply->type, FrameType::kHelloReply);
  // It claims every byte compared and equal without asking for a digest.
  pb::VerifyEnd end;
  end.set_seq(2);
  end.set_compared_bytes(size_);
  end.set_grain(kDigestGrain);
  ASSERT_TRUE(ours->Send(FrameType::kVerifyEnd, end.SerializeAsString(), {}).ok());
  auto refused = ours->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(refused.ok());
  EXPECT_EQ(refused->type, FrameType::kLinkError);
  EXPECT_THAT(StatusFromLinkError(*refused, "sink").message(),
              HasSubstr("ended with 4194304 bytes compared, 0 served"));
  serve.join();
  EXPECT_FALSE((*sink_->Points("vol1"))[1].verification.has_value());
}

}  // namespace
}  // namespace cairn
