#include "engine/catalog/catalog.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <xxhash.h>

#include <functional>
#include <set>

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

SinkInstance Instance(const std::string& addr, int64_t pid) {
  SinkInstance s;
  s.addr = addr;
  s.site = "b";
  s.host = "node-1";
  s.pid = pid;
  s.boot_id = "0b5e1d1e-8c1b-4b7e-9a43-5d2f0c9a1e11";
  s.started_ns = 1'795'582'215'089'000'000;
  return s;
}

// A record as a newer cairnd might write it: fields this build does not know.
std::string RawRecord(const std::string& lines) {
  std::string out(1, '\x01');
  out += lines;
  const uint64_t h = XXH3_64bits(out.data(), out.size());
  out.append(reinterpret_cast<const char*>(&h), sizeof h);
  return out;
}

TEST(SinkInstanceRecord, RoundTripAndDescription) {
  const SinkInstance s = Instance("127.0.0.1:0/3215435001", 4242);
  auto d = DecodeSinkInstance(EncodeSinkInstance(s), "instance/sink");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(*d, s);
  EXPECT_EQ(DescribeSinkInstance(s),
            "127.0.0.1:0/3215435001 (cairnd pid 4242 on host node-1, site b, started "
            "2026-11-25T04:50:15Z)");
}

TEST(SinkInstanceRecord, NewlinesInValuesCannotForgeFields) {
  SinkInstance s = Instance("10.0.0.1:0/1", 1);
  s.host = "evil\naddr=10.9.9.9:0/9";
  auto d = DecodeSinkInstance(EncodeSinkInstance(s), "instance/sink");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->addr, "10.0.0.1:0/1");
  EXPECT_EQ(d->host, "evil addr=10.9.9.9:0/9");
}

TEST(SinkInstanceRecord, UnknownFieldsAreSkippedAnAddressIsRequired) {
  auto d = DecodeSinkInstance(RawRecord("addr=10.0.0.1:0/7\nzone=z1\npid=12\n"), "k");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->addr, "10.0.0.1:0/7");
  EXPECT_EQ(d->pid, 12);
  auto no_addr = DecodeSinkInstance(RawRecord("pid=12\n"), "instance/sink");
  EXPECT_EQ(no_addr.status().code(), Code::kDataLoss);
  EXPECT_EQ(no_addr.status().message(), "catalog record instance/sink names no address");
  auto bad_pid = DecodeSinkInstance(RawRecord("addr=a:0/1\npid=x\n"), "instance/sink");
  EXPECT_EQ(bad_pid.status().message(), "catalog record instance/sink: pid is not a number");
}

TEST(SinkInstanceRecord, EveryFlippedByteIsAChecksumMismatch) {
  const std::string good = EncodeSinkInstance(Instance("127.0.0.1:0/5", 5));
  for (size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] ^= 0x01;
    auto d = DecodeSinkInstance(bad, "instance/sink");
    ASSERT_EQ(d.status().code(), Code::kDataLoss) << i;
    EXPECT_EQ(d.status().message(), "catalog record instance/sink checksum mismatch") << i;
  }
  EXPECT_THAT(DecodeSinkInstance("abc", "k").status().message(), HasSubstr("truncated"));
}

TEST(SinkInstanceRecord, DoesNotClashWithPointsOrOwners) {
  MemoryKvStore kv;
  Catalog c(kv);
  ASSERT_TRUE(c.AddPoint(Point("instance", 1)).ok());
  ASSERT_TRUE(c.SetImageOwner("rbd", "sink", "instance").ok());
  EXPECT_FALSE(c.SinkInstanceRecord()->has_value());
  ASSERT_TRUE(c.ReplaceSinkInstance(std::nullopt, Instance("a:0/1", 1)).ok());
  EXPECT_EQ(*c.Volumes(), std::vector<std::string>{"instance"});
  EXPECT_EQ(c.Points("instance")->size(), 1u);
  EXPECT_EQ(*c.ImageOwner("rbd", "sink"), "instance");
  EXPECT_EQ((*c.SinkInstanceRecord())->instance.addr, "a:0/1");
}

// Records every fence; fails those whose address is in `refuse`.
struct FakeFence {
  std::vector<std::string> fenced;
  std::set<std::string> refuse;
  FenceFn fn() {
    return [this](const SinkInstance& prev) {
      if (refuse.count(prev.addr)) return FailedPrecondition("client.cairn may not blocklist");
      fenced.push_back(prev.addr);
      return OkStatus();
    };
  }
};

std::string RecordedAddr(KvStore& kv) {
  auto rec = Catalog(kv).SinkInstanceRecord();
  if (!rec.ok()) return "<" + rec.status().ToString() + ">";
  return *rec ? (*rec)->instance.addr : "";
}

TEST(FenceAndRegisterSink, AFirstStartFencesNothingAndRegistersEverywhere) {
  MemoryKvStore rbd, volumes;
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}, {"volumes", &volumes}},
                                Instance("127.0.0.1:0/2", 2), fence.fn());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
  EXPECT_TRUE(fence.fenced.empty());
  EXPECT_EQ(RecordedAddr(rbd), "127.0.0.1:0/2");
  EXPECT_EQ(RecordedAddr(volumes), "127.0.0.1:0/2");
}

TEST(FenceAndRegisterSink, ThePreviousInstanceIsFencedOnceForAllItsPools) {
  MemoryKvStore rbd, volumes, fresh;
  const SinkInstance prev = Instance("127.0.0.1:0/1", 1);
  ASSERT_TRUE(Catalog(rbd).ReplaceSinkInstance(std::nullopt, prev).ok());
  ASSERT_TRUE(Catalog(volumes).ReplaceSinkInstance(std::nullopt, prev).ok());
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}, {"fresh", &fresh}, {"volumes", &volumes}},
                                Instance("127.0.0.1:0/2", 2), fence.fn());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, std::vector<std::string>{"127.0.0.1:0/1"});
  ASSERT_EQ(r->size(), 1u);
  EXPECT_EQ((*r)[0].instance, prev);
  EXPECT_EQ((*r)[0].pools, (std::vector<std::string>{"rbd", "volumes"}));
  for (KvStore* kv : {&rbd, &volumes, &fresh}) EXPECT_EQ(RecordedAddr(*kv), "127.0.0.1:0/2");
}

TEST(FenceAndRegisterSink, DifferentPreviousInstancesPerPoolAreEachFenced) {
  MemoryKvStore rbd, volumes;
  ASSERT_TRUE(Catalog(rbd).ReplaceSinkInstance(std::nullopt, Instance("10.0.0.1:0/1", 1)).ok());
  ASSERT_TRUE(Catalog(volumes).ReplaceSinkInstance(std::nullopt, Instance("10.0.0.2:0/9", 9)).ok());
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}, {"volumes", &volumes}}, Instance("10.0.0.3:0/3", 3),
                                fence.fn());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, (std::vector<std::string>{"10.0.0.1:0/1", "10.0.0.2:0/9"}));
  ASSERT_EQ(r->size(), 2u);
  EXPECT_EQ((*r)[1].pools, std::vector<std::string>{"volumes"});
}

TEST(FenceAndRegisterSink, ItsOwnAddressIsNeverFenced) {
  MemoryKvStore rbd;
  const SinkInstance self = Instance("127.0.0.1:0/2", 2);
  ASSERT_TRUE(Catalog(rbd).ReplaceSinkInstance(std::nullopt, self).ok());
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}}, self, fence.fn());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->empty());
  EXPECT_TRUE(fence.fenced.empty());
}

TEST(FenceAndRegisterSink, AFailedFenceRecordsNothingFromThatPoolOn) {
  MemoryKvStore rbd, volumes, later;
  ASSERT_TRUE(Catalog(rbd).ReplaceSinkInstance(std::nullopt, Instance("10.0.0.1:0/1", 1)).ok());
  ASSERT_TRUE(Catalog(volumes).ReplaceSinkInstance(std::nullopt, Instance("10.0.0.2:0/2", 2)).ok());
  FakeFence fence;
  fence.refuse = {"10.0.0.2:0/2"};
  auto r = FenceAndRegisterSink({{"rbd", &rbd}, {"volumes", &volumes}, {"later", &later}},
                                Instance("10.0.0.3:0/3", 3), fence.fn());
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(),
              HasSubstr("pool volumes: fencing the previous sink 10.0.0.2:0/2 (cairnd pid 2"));
  EXPECT_THAT(r.status().message(), HasSubstr("client.cairn may not blocklist"));
  // The next start must still know whom to fence.
  EXPECT_EQ(RecordedAddr(volumes), "10.0.0.2:0/2");
  EXPECT_EQ(RecordedAddr(later), "");
}

TEST(FenceAndRegisterSink, AnUnreadableRecordStopsTheStartAndSaysHowToClearIt) {
  MemoryKvStore rbd;
  std::string bad = EncodeSinkInstance(Instance("10.0.0.1:0/1", 1));
  bad[4] ^= 1;
  ASSERT_TRUE(rbd.Commit({{"instance/sink", bad}}, {}).ok());
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}}, Instance("10.0.0.3:0/3", 3), fence.fn());
  EXPECT_EQ(r.status().code(), Code::kDataLoss);
  EXPECT_THAT(r.status().message(),
              HasSubstr("rados -p rbd rmomapkey cairn.catalog instance/sink"));
  EXPECT_TRUE(fence.fenced.empty());
  EXPECT_EQ(*rbd.Get("instance/sink"), bad);
}

// A KvStore whose CommitIf first lets `before` run: another sink starting
// at the same moment.
class RacingKvStore final : public KvStore {
 public:
  std::function<void(MemoryKvStore&)> before;
  MemoryKvStore inner;
  Status Commit(const std::map<std::string, std::string>& set,
                const std::vector<std::string>& remove) override {
    return inner.Commit(set, remove);
  }
  Status CommitIf(const std::string& key, const std::optional<std::string>& expected,
                  const std::map<std::string, std::string>& set,
                  const std::vector<std::string>& remove) override {
    if (before) before(inner);
    return inner.CommitIf(key, expected, set, remove);
  }
  StatusOr<std::map<std::string, std::string>> Scan(const std::string& prefix) override {
    return inner.Scan(prefix);
  }
  StatusOr<std::string> Get(const std::string& key) override { return inner.Get(key); }
};

TEST(FenceAndRegisterSink, ASinkRegisteringMeanwhileIsFencedTooTheLastOneStays) {
  RacingKvStore rbd;
  ASSERT_TRUE(
      Catalog(rbd.inner).ReplaceSinkInstance(std::nullopt, Instance("10.0.0.1:0/1", 1)).ok());
  int races = 1;
  rbd.before = [&](MemoryKvStore& kv) {
    if (races-- > 0) {  // between our read and our write
      ASSERT_TRUE(
          kv.Commit({{"instance/sink", EncodeSinkInstance(Instance("10.0.0.2:0/2", 2))}}, {}).ok());
    }
  };
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}}, Instance("10.0.0.3:0/3", 3), fence.fn());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, (std::vector<std::string>{"10.0.0.1:0/1", "10.0.0.2:0/2"}));
  EXPECT_EQ(RecordedAddr(rbd.inner), "10.0.0.3:0/3");
}

TEST(FenceAndRegisterSink, ARecordThatNeverSettlesIsUnavailable) {
  RacingKvStore rbd;
  int n = 0;
  rbd.before = [&](MemoryKvStore& kv) {
    ++n;
    const SinkInstance other = Instance("10.0.1." + std::to_string(n) + ":0/1", n);
    ASSERT_TRUE(kv.Commit({{"instance/sink", EncodeSinkInstance(other)}}, {}).ok());
  };
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd}}, Instance("10.0.0.3:0/3", 3), fence.fn());
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("restarting in a loop"));
  EXPECT_EQ(fence.fenced.size(), 4u);  // every round but the first met a new one
}

}  // namespace
}  // namespace cairn
