#include "engine/catalog/catalog.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace cairn {
namespace {

using ::testing::HasSubstr;

RestorePoint Point(const std::string& vol, uint64_t seq) {
  RestorePoint p;
  p.epoch.volume = vol;
  p.epoch.seq = seq;
  p.epoch.base_seq = seq - 1;
  p.epoch.snap_time_ns = 1'700'000'000'000'000'000 + seq;
  p.created_time_ns = p.epoch.snap_time_ns + 5;
  p.pool = "rbd";
  p.image = vol + "-standby";
  p.snap = SnapName(seq);
  p.epoch.image_size = 10 << 20;
  p.data_bytes = seq * 4096;
  p.zero_bytes = 512;
  EpochHasher h(seq, 1);
  p.epoch_digest = h.Finish();
  p.chain_digest = NextChain(ChainDigest(), p.epoch_digest, seq);
  p.epoch.source_site = "a";
  return p;
}

TEST(Catalog, EncodeDecodeRoundTrip) {
  const RestorePoint p = Point("vol-1", 7);
  auto d = DecodeRestorePoint(EncodeRestorePoint(p), "k");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(*d, p);
}

TEST(Catalog, EveryFlippedByteIsAChecksumMismatch) {
  const std::string good = EncodeRestorePoint(Point("v", 3));
  for (size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] ^= 0x01;
    auto d = DecodeRestorePoint(bad, "point/v/3");
    ASSERT_FALSE(d.ok()) << i;
    EXPECT_EQ(d.status().code(), Code::kDataLoss) << i;
    EXPECT_EQ(d.status().message(), "catalog record point/v/3 checksum mismatch") << i;
  }
  EXPECT_THAT(DecodeRestorePoint("abc", "k").status().message(), HasSubstr("truncated"));
}

TEST(Catalog, PointsAreOrderedPerVolume) {
  MemoryKvStore kv;
  Catalog c(kv);
  for (uint64_t s : {3, 1, 12, 2}) ASSERT_TRUE(c.AddPoint(Point("a", s)).ok());
  ASSERT_TRUE(c.AddPoint(Point("ab", 5)).ok());
  auto pts = c.Points("a");
  ASSERT_TRUE(pts.ok());
  ASSERT_EQ(pts->size(), 4u);
  EXPECT_EQ((*pts)[0].epoch.seq, 1u);
  EXPECT_EQ((*pts)[3].epoch.seq, 12u);  // numeric, not lexical, order
  auto latest = c.Latest("a");
  ASSERT_TRUE(latest.ok() && latest->has_value());
  EXPECT_EQ((*latest)->epoch.seq, 12u);
  EXPECT_EQ(c.Get("a", 2)->epoch.seq, 2u);
  EXPECT_EQ(c.Get("a", 4).status().message(), "volume a has no restore point 4");
  auto vols = c.Volumes();
  ASSERT_TRUE(vols.ok());
  EXPECT_EQ(*vols, (std::vector<std::string>{"a", "ab"}));
  ASSERT_TRUE(c.RemovePoint("a", 12).ok());
  EXPECT_EQ((*c.Latest("a"))->epoch.seq, 3u);
  EXPECT_FALSE(c.Latest("none")->has_value());
}

TEST(Catalog, CorruptRecordInStoreIsReportedNotSkipped) {
  MemoryKvStore kv;
  Catalog c(kv);
  ASSERT_TRUE(c.AddPoint(Point("a", 1)).ok());
  std::string v = *kv.Get("point/a/00000000000000000001");
  v[3] ^= 1;
  ASSERT_TRUE(kv.Commit({{"point/a/00000000000000000001", v}}, {}).ok());
  auto pts = c.Points("a");
  EXPECT_EQ(pts.status().code(), Code::kDataLoss);
  EXPECT_THAT(pts.status().message(), HasSubstr("point/a/00000000000000000001 checksum mismatch"));
}

TEST(Catalog, AVerificationIsKeptBesideItsPointAndGoesWithIt) {
  MemoryKvStore kv;
  Catalog c(kv);
  ASSERT_TRUE(c.AddPoint(Point("a", 1)).ok());
  ASSERT_TRUE(c.AddPoint(Point("a", 2)).ok());
  const PointVerification v{.recorded_ns = 1'800'000'000'000'000'000,
                            .compared_bytes = 10 << 20,
                            .mismatched_grains = 3,
                            .grain = 65536};
  ASSERT_TRUE(c.SetVerification("a", 2, v).ok());
  EXPECT_EQ(c.SetVerification("a", 9, v).code(), Code::kNotFound);
  auto pts = c.Points("a");
  ASSERT_TRUE(pts.ok());
  EXPECT_FALSE((*pts)[0].verification.has_value());
  ASSERT_TRUE((*pts)[1].verification.has_value());
  EXPECT_EQ(*(*pts)[1].verification, v);
  EXPECT_EQ(c.Get("a", 2)->verification, v);
  // Not part of the point's own record.
  EXPECT_FALSE(
      DecodeRestorePoint(*kv.Get("point/a/00000000000000000002"), "k")->verification.has_value());
  // A damaged verification record is reported, not taken as "never verified".
  std::string raw = *kv.Get("verified/a/00000000000000000002");
  raw[2] ^= 1;
  ASSERT_TRUE(kv.Commit({{"verified/a/00000000000000000002", raw}}, {}).ok());
  EXPECT_EQ(c.Points("a").status().code(), Code::kDataLoss);
  ASSERT_TRUE(c.RemovePoint("a", 2).ok());
  EXPECT_EQ(kv.Get("verified/a/00000000000000000002").status().code(), Code::kNotFound);
}

TEST(Catalog, ImageOwner) {
  MemoryKvStore kv;
  Catalog c(kv);
  EXPECT_EQ(*c.ImageOwner("rbd", "img"), "");
  ASSERT_TRUE(c.SetImageOwner("rbd", "img", "vol").ok());
  EXPECT_EQ(*c.ImageOwner("rbd", "img"), "vol");
}

TEST(Catalog, VolumeIdsAndSnapNames) {
  EXPECT_TRUE(ValidateVolumeId("vol-1_a.b").ok());
  EXPECT_FALSE(ValidateVolumeId("").ok());
  EXPECT_FALSE(ValidateVolumeId(".hidden").ok());
  EXPECT_THAT(ValidateVolumeId("a/b").message(), HasSubstr("has '/'"));
  EXPECT_FALSE(ValidateVolumeId(std::string(129, 'a')).ok());
  EXPECT_EQ(SnapName(42), "cairn.42");
  EXPECT_EQ(ParseSnapName("cairn.42"), 42u);
  EXPECT_FALSE(ParseSnapName("cairn.0"));
  EXPECT_FALSE(ParseSnapName("cairn.4x"));
  EXPECT_FALSE(ParseSnapName("other.4"));
}

TEST(SinkInstanceRecord, DoesNotClashWithPointsOrOwners) {
  MemoryKvStore kv;
  Catalog c(kv);
  ASSERT_TRUE(c.AddPoint(Point("instance", 1)).ok());
  ASSERT_TRUE(c.SetImageOwner("rbd", "sink", "instance").ok());
  EXPECT_FALSE(c.SinkInstanceRecord()->has_value());
  SinkInstance self;
  self.addr = "a:0/1";
  ASSERT_TRUE(c.ReplaceSinkInstance(std::nullopt, self).ok());
  EXPECT_EQ(*c.Volumes(), std::vector<std::string>{"instance"});
  EXPECT_EQ(c.Points("instance")->size(), 1u);
  EXPECT_EQ(*c.ImageOwner("rbd", "sink"), "instance");
  EXPECT_EQ((*c.SinkInstanceRecord())->instance.addr, "a:0/1");
}

}  // namespace
}  // namespace cairn
