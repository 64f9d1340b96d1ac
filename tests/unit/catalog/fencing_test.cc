// The sink instance record, and FenceAndRegisterSink over MemoryKvStore and
// MemorySinkLock: a starting sink fences whoever holds the sink lock, and
// nothing a record names.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <xxhash.h>

#include <functional>
#include <memory>
#include <set>

#include "engine/catalog/catalog.h"
#include "engine/catalog/sink_lock.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;

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

// One pool of site B: its catalog and the lock on it, as each client sees it.
struct Pool {
  std::string name;
  MemoryKvStore kv;
  std::shared_ptr<MemorySinkLockState> lock = std::make_shared<MemorySinkLockState>();

  explicit Pool(std::string n) : name(std::move(n)) {}
  // A sink that ran at `addr`: it holds the lock and recorded itself.
  void RanSink(const std::string& addr, int64_t pid) {
    MemorySinkLock l(lock, addr);
    ASSERT_TRUE(l.Take().ok());
    ASSERT_TRUE(kv.Commit({{"instance/sink", EncodeSinkInstance(Instance(addr, pid))}}, {}).ok());
  }
  std::vector<std::string> HolderAddrs() {
    std::vector<std::string> out;
    for (const auto& h : lock->holders) out.push_back(h.addr);
    return out;
  }
  std::string RecordedAddr() {
    auto rec = Catalog(kv).SinkInstanceRecord();
    if (!rec.ok()) return "<" + rec.status().ToString() + ">";
    return *rec ? (*rec)->instance.addr : "";
  }
};

// Starts the sink `self` on `pools`, each lock handle bound to its address.
StatusOr<SinkRegistration> Start(const std::vector<Pool*>& pools, const SinkInstance& self,
                                 FakeFence& fence) {
  std::vector<std::unique_ptr<MemorySinkLock>> locks;
  std::vector<SinkCatalog> catalogs;
  for (Pool* p : pools) {
    locks.push_back(std::make_unique<MemorySinkLock>(p->lock, self.addr));
    catalogs.push_back({p->name, &p->kv, locks.back().get()});
  }
  return FenceAndRegisterSink(catalogs, self, fence.fn());
}

TEST(FenceAndRegisterSink, AFirstStartFencesNothingAndRegistersEverywhere) {
  Pool rbd("rbd"), volumes("volumes");
  FakeFence fence;
  auto r = Start({&rbd, &volumes}, Instance("127.0.0.1:0/2", 2), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->fenced.empty());
  EXPECT_TRUE(r->warnings.empty());
  EXPECT_TRUE(fence.fenced.empty());
  for (Pool* p : {&rbd, &volumes}) {
    EXPECT_EQ(p->RecordedAddr(), "127.0.0.1:0/2");
    EXPECT_EQ(p->HolderAddrs(), std::vector<std::string>{"127.0.0.1:0/2"});
  }
}

TEST(FenceAndRegisterSink, ThePreviousHolderIsFencedOnceForAllItsPools) {
  Pool rbd("rbd"), fresh("fresh"), volumes("volumes");
  rbd.RanSink("127.0.0.1:0/1", 1);
  volumes.RanSink("127.0.0.1:0/1", 1);
  FakeFence fence;
  auto r = Start({&rbd, &fresh, &volumes}, Instance("127.0.0.1:0/2", 2), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, std::vector<std::string>{"127.0.0.1:0/1"});
  ASSERT_EQ(r->fenced.size(), 1u);
  EXPECT_EQ(r->fenced[0].instance, Instance("127.0.0.1:0/1", 1));  // described by its record
  EXPECT_EQ(r->fenced[0].pools, (std::vector<std::string>{"rbd", "volumes"}));
  for (Pool* p : {&rbd, &volumes, &fresh}) {
    EXPECT_EQ(p->RecordedAddr(), "127.0.0.1:0/2");
    EXPECT_EQ(p->HolderAddrs(), std::vector<std::string>{"127.0.0.1:0/2"});
  }
}

TEST(FenceAndRegisterSink, DifferentHoldersPerPoolAreEachFenced) {
  Pool rbd("rbd"), volumes("volumes");
  rbd.RanSink("10.0.0.1:0/1", 1);
  volumes.RanSink("10.0.0.2:0/9", 9);
  FakeFence fence;
  auto r = Start({&rbd, &volumes}, Instance("10.0.0.3:0/3", 3), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, (std::vector<std::string>{"10.0.0.1:0/1", "10.0.0.2:0/9"}));
  ASSERT_EQ(r->fenced.size(), 2u);
  EXPECT_EQ(r->fenced[1].pools, std::vector<std::string>{"volumes"});
}

TEST(FenceAndRegisterSink, ItsOwnAddressIsNeverFenced) {
  Pool rbd("rbd");
  rbd.RanSink("127.0.0.1:0/2", 2);
  FakeFence fence;
  auto r = Start({&rbd}, Instance("127.0.0.1:0/2", 2), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(r->fenced.empty());
  EXPECT_TRUE(fence.fenced.empty());
}

// A writer to the pool forges the record to name a hypervisor: the sink
// must not blocklist it. It says so, and records itself.
TEST(FenceAndRegisterSink, ARecordNamingAClientWithoutTheLockFencesNobody) {
  Pool rbd("rbd");
  ASSERT_TRUE(Catalog(rbd.kv).ReplaceSinkInstance(std::nullopt, Instance("10.9.9.9:0/7", 7)).ok());
  FakeFence fence;
  auto r = Start({&rbd}, Instance("10.0.0.3:0/3", 3), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_TRUE(fence.fenced.empty());
  EXPECT_TRUE(r->fenced.empty());
  ASSERT_EQ(r->warnings.size(), 1u);
  EXPECT_THAT(r->warnings[0], HasSubstr("pool rbd: the sink instance record names 10.9.9.9:0/7"));
  EXPECT_THAT(r->warnings[0], HasSubstr("holds no sink lock: not fenced"));
  EXPECT_EQ(rbd.RecordedAddr(), "10.0.0.3:0/3");
}

// A forged record cannot redirect the fence either: the holder is fenced,
// described by its address alone, not by the record's other client.
TEST(FenceAndRegisterSink, TheHolderIsFencedWhateverTheRecordSays) {
  Pool rbd("rbd");
  rbd.RanSink("10.0.0.1:0/1", 1);
  ASSERT_TRUE(
      rbd.kv.Commit({{"instance/sink", EncodeSinkInstance(Instance("10.9.9.9:0/7", 7))}}, {}).ok());
  FakeFence fence;
  auto r = Start({&rbd}, Instance("10.0.0.3:0/3", 3), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, std::vector<std::string>{"10.0.0.1:0/1"});
  EXPECT_EQ(DescribeSinkInstance(r->fenced[0].instance),
            "10.0.0.1:0/1 (no instance record describes it)");
  ASSERT_EQ(r->warnings.size(), 1u);
  EXPECT_THAT(r->warnings[0], HasSubstr("names 10.9.9.9:0/7"));
}

TEST(FenceAndRegisterSink, AFailedFenceLeavesThatPoolsLockAndRecordAsTheyWere) {
  Pool rbd("rbd"), volumes("volumes"), later("later");
  rbd.RanSink("10.0.0.1:0/1", 1);
  volumes.RanSink("10.0.0.2:0/2", 2);
  FakeFence fence;
  fence.refuse = {"10.0.0.2:0/2"};
  auto r = Start({&rbd, &volumes, &later}, Instance("10.0.0.3:0/3", 3), fence);
  EXPECT_EQ(r.status().code(), Code::kFailedPrecondition);
  EXPECT_THAT(r.status().message(),
              HasSubstr("pool volumes: fencing the previous sink 10.0.0.2:0/2 (cairnd pid 2"));
  EXPECT_THAT(r.status().message(), HasSubstr("client.cairn may not blocklist"));
  // The next start must still find whom to fence.
  EXPECT_EQ(volumes.HolderAddrs(), std::vector<std::string>{"10.0.0.2:0/2"});
  EXPECT_EQ(volumes.RecordedAddr(), "10.0.0.2:0/2");
  EXPECT_TRUE(later.HolderAddrs().empty());
  EXPECT_EQ(later.RecordedAddr(), "");
}

TEST(FenceAndRegisterSink, AnUnreadableRecordIsReplacedWithAWarning) {
  Pool rbd("rbd");
  rbd.RanSink("10.0.0.1:0/1", 1);
  std::string bad = EncodeSinkInstance(Instance("10.0.0.1:0/1", 1));
  bad[4] ^= 1;
  ASSERT_TRUE(rbd.kv.Commit({{"instance/sink", bad}}, {}).ok());
  FakeFence fence;
  auto r = Start({&rbd}, Instance("10.0.0.3:0/3", 3), fence);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, std::vector<std::string>{"10.0.0.1:0/1"});  // the lock still says
  ASSERT_EQ(r->warnings.size(), 1u);
  EXPECT_THAT(r->warnings[0], HasSubstr("the sink instance record is unreadable"));
  EXPECT_THAT(r->warnings[0], HasSubstr("checksum mismatch"));
  EXPECT_EQ(rbd.RecordedAddr(), "10.0.0.3:0/3");
}

// A SinkLock whose Take first lets `before` run: another sink starting at
// the same moment.
class RacingSinkLock final : public SinkLock {
 public:
  RacingSinkLock(std::shared_ptr<MemorySinkLockState> state, const std::string& addr)
      : inner_(std::move(state), addr) {}
  std::function<void()> before;
  StatusOr<std::vector<SinkLockHolder>> Holders() override { return inner_.Holders(); }
  Status Take() override {
    if (before) before();
    return inner_.Take();
  }
  Status Break(const SinkLockHolder& h) override { return inner_.Break(h); }
  Status Release() override { return inner_.Release(); }
  const std::string& self_addr() const override { return inner_.self_addr(); }

 private:
  MemorySinkLock inner_;
};

TEST(FenceAndRegisterSink, ASinkTakingTheLockMeanwhileIsFencedTooTheLastOneStays) {
  Pool rbd("rbd");
  rbd.RanSink("10.0.0.1:0/1", 1);
  RacingSinkLock lock(rbd.lock, "10.0.0.3:0/3");
  int races = 1;
  lock.before = [&] {
    if (races-- > 0) rbd.RanSink("10.0.0.2:0/2", 2);  // between our break and our take
  };
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd.kv, &lock}}, Instance("10.0.0.3:0/3", 3), fence.fn());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(fence.fenced, (std::vector<std::string>{"10.0.0.1:0/1", "10.0.0.2:0/2"}));
  EXPECT_EQ(rbd.HolderAddrs(), std::vector<std::string>{"10.0.0.3:0/3"});
  EXPECT_EQ(rbd.RecordedAddr(), "10.0.0.3:0/3");
}

TEST(FenceAndRegisterSink, ALockThatNeverSettlesIsUnavailable) {
  Pool rbd("rbd");
  RacingSinkLock lock(rbd.lock, "10.0.0.3:0/3");
  int n = 0;
  lock.before = [&] {
    ++n;
    rbd.RanSink("10.0.1." + std::to_string(n) + ":0/1", n);
  };
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd.kv, &lock}}, Instance("10.0.0.3:0/3", 3), fence.fn());
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_THAT(r.status().message(), HasSubstr("restarting in a loop"));
  EXPECT_EQ(fence.fenced.size(), 4u);  // every round but the first met a new one
}

TEST(FenceAndRegisterSink, ALockTakenAsAnotherAddressIsRefused) {
  Pool rbd("rbd");
  MemorySinkLock lock(rbd.lock, "10.0.0.4:0/4");
  FakeFence fence;
  auto r = FenceAndRegisterSink({{"rbd", &rbd.kv, &lock}}, Instance("10.0.0.3:0/3", 3), fence.fn());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_TRUE(rbd.HolderAddrs().empty());
}

TEST(MemorySinkLock, OneHolderAtATimeAndReleaseFreesIt) {
  auto state = std::make_shared<MemorySinkLockState>();
  MemorySinkLock a(state, "a:0/1"), b(state, "b:0/2");
  ASSERT_TRUE(a.Take().ok());
  EXPECT_TRUE(a.Take().ok());  // again: still its own
  EXPECT_EQ(b.Take().code(), Code::kAborted);
  ASSERT_TRUE(a.Release().ok());
  EXPECT_TRUE(b.Take().ok());
  EXPECT_EQ(b.Holders()->size(), 1u);
}

}  // namespace
}  // namespace cairn
