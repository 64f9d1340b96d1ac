// The KvStore conformance suite over RadosKvStore on a real cluster, plus
// what only RADOS has: durability across clients, key rules; and the sink
// lock (RadosSinkLock) that a starting sink fences through.
//
// Needs CAIRN_TEST_CEPH_CONF (see tests/ceph/volume_rbd_test.cc); without it
// every test fails, saying so. Objects are named cairn-test-kv-<pid>-<n> and
// removed after each test.
#include <fmt/format.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>

#include "engine/catalog/catalog.h"
#include "engine/ceph/rados_kv_store.h"
#include "engine/ceph/rados_sink_lock.h"
#include "engine/ceph/rbd_volume.h"
#include "tests/unit/catalog/kv_store_conformance.h"

namespace cairn {
namespace {

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

StatusOr<std::shared_ptr<RbdCluster>> ConnectTestCluster() {
  const std::string conf = EnvOr("CAIRN_TEST_CEPH_CONF", "");
  if (conf.empty()) {
    return FailedPrecondition(
        "CAIRN_TEST_CEPH_CONF is not set: the Ceph tests need a cluster. Start one with "
        "`tests/cluster/testbed.sh start DIR` and set CAIRN_TEST_CEPH_CONF to its ceph.conf "
        "(optional: CAIRN_TEST_POOL, default rbd; CAIRN_TEST_CEPH_USER; CAIRN_TEST_CEPH_KEYRING)");
  }
  return RbdCluster::Connect(conf, EnvOr("CAIRN_TEST_CEPH_USER", "admin"),
                             EnvOr("CAIRN_TEST_CEPH_KEYRING", ""), std::chrono::seconds(20));
}

StatusOr<std::shared_ptr<RadosIoCtx>> TestIoCtx() {
  static std::mutex mu;
  static std::shared_ptr<RbdCluster> cluster;
  {
    std::lock_guard lock(mu);
    if (!cluster) {
      ASSIGN_OR_RETURN(cluster, ConnectTestCluster());
    }
  }
  return cluster->OpenIoCtx(EnvOr("CAIRN_TEST_POOL", "rbd"));
}

std::string NewObjectName() {
  static std::atomic<int> counter{0};
  return fmt::format("cairn-test-kv-{}-{}", getpid(), counter++);
}

INSTANTIATE_TEST_SUITE_P(Rados, KvStoreConformanceTest,
                         ::testing::Values(KvStoreConformanceParam{
                             "RadosKvStore",
                             []() -> StatusOr<KvStoreTarget> {
                               ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, TestIoCtx());
                               const std::string object = NewObjectName();
                               KvStoreTarget t;
                               t.store = std::make_unique<RadosKvStore>(io, object);
                               t.cleanup = [io, object] {
                                 rados_remove(io->get(), object.c_str());
                               };
                               return t;
                             }}),
                         KvStoreParamName);

class RadosKvStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StatusOr<std::shared_ptr<RadosIoCtx>> io = TestIoCtx();
    ASSERT_TRUE(io.ok()) << io.status().ToString();
    io_ = *io;
    object_ = NewObjectName();
  }
  void TearDown() override {
    if (io_) rados_remove(io_->get(), object_.c_str());
  }
  std::shared_ptr<RadosIoCtx> io_;
  std::string object_;
};

TEST_F(RadosKvStoreTest, AnotherClientSeesACommit) {
  RadosKvStore kv(io_, object_);
  ASSERT_TRUE(kv.Commit({{"point/v/1", "one"}}, {}).ok());
  // A separate connection: what a replicator taking over would see.
  StatusOr<std::shared_ptr<RbdCluster>> other = ConnectTestCluster();
  ASSERT_TRUE(other.ok()) << other.status().ToString();
  StatusOr<std::shared_ptr<KvStore>> kv2 =
      (*other)->OpenKvStore(EnvOr("CAIRN_TEST_POOL", "rbd"), object_);
  ASSERT_TRUE(kv2.ok()) << kv2.status().ToString();
  StatusOr<std::string> v = (*kv2)->Get("point/v/1");
  ASSERT_TRUE(v.ok()) << v.status().ToString();
  EXPECT_EQ(*v, "one");
}

TEST_F(RadosKvStoreTest, AKeyWithANulByteIsRefused) {
  RadosKvStore kv(io_, object_);
  const Status s = kv.Commit({{std::string("a\0b", 3), "v"}}, {});
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  // Nothing was written, not even the object.
  StatusOr<std::map<std::string, std::string>> all = kv.Scan("");
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->empty());
  uint64_t size = 0;
  time_t mtime = 0;
  EXPECT_EQ(rados_stat(io_->get(), object_.c_str(), &size, &mtime), -ENOENT);
}

TEST_F(RadosKvStoreTest, ErrorsNameThePoolAndObject) {
  RadosKvStore kv(io_, object_);
  const Status s = kv.Get("missing").status();
  EXPECT_EQ(s.code(), Code::kNotFound);
  EXPECT_NE(s.message().find(io_->pool() + "/" + object_), std::string::npos) << s.ToString();
}

// --- the sink lock ----------------------------------------------------------

StatusOr<std::unique_ptr<RadosSinkLock>> LockOf(const std::shared_ptr<RbdCluster>& c,
                                                const std::string& object) {
  ASSIGN_OR_RETURN(auto io, c->OpenIoCtx(EnvOr("CAIRN_TEST_POOL", "rbd")));
  return RadosSinkLock::Open(std::move(io), object, "test");
}

TEST_F(RadosKvStoreTest, TheSinkLockNamesWhoTookItAndIsExclusive) {
  StatusOr<std::shared_ptr<RbdCluster>> a = ConnectTestCluster();
  StatusOr<std::shared_ptr<RbdCluster>> b = ConnectTestCluster();
  ASSERT_TRUE(a.ok() && b.ok());
  auto la = LockOf(*a, object_);
  auto lb = LockOf(*b, object_);
  ASSERT_TRUE(la.ok() && lb.ok()) << la.status().ToString() << lb.status().ToString();
  EXPECT_EQ((*la)->self_addr(), *(*a)->ClientAddress());
  EXPECT_TRUE((*la)->Holders()->empty());
  ASSERT_TRUE((*la)->Take().ok());
  ASSERT_TRUE((*la)->Take().ok()) << "taking it again must be a no-op";
  EXPECT_EQ((*lb)->Take().code(), Code::kAborted);
  auto holders = (*lb)->Holders();
  ASSERT_TRUE(holders.ok()) << holders.status().ToString();
  ASSERT_EQ(holders->size(), 1u);
  // The address the OSD recorded, which Blocklist takes.
  EXPECT_EQ((*holders)[0].addr, (*la)->self_addr());
  ASSERT_TRUE((*lb)->Break((*holders)[0]).ok());
  ASSERT_TRUE((*lb)->Break((*holders)[0]).ok()) << "breaking a gone hold must be a no-op";
  ASSERT_TRUE((*lb)->Take().ok());
  EXPECT_EQ((*lb)->Holders()->at(0).addr, (*lb)->self_addr());
  ASSERT_TRUE((*lb)->Release().ok());
  EXPECT_TRUE((*la)->Holders()->empty());
}

// The threat: a client that may write the pool (a hypervisor's) forges the
// sink instance record to name another client. The starting sink fences
// the real previous sink (the lock holder) and nobody else.
TEST_F(RadosKvStoreTest, AStartingSinkFencesTheHolderNeverWhatAForgedRecordNames) {
  std::shared_ptr<RbdCluster> clients[3];  // the previous sink, a hypervisor, the new sink
  for (auto& c : clients) {
    auto r = ConnectTestCluster();
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    c = *r;
  }
  const std::string pool = EnvOr("CAIRN_TEST_POOL", "rbd");
  auto old_lock = LockOf(clients[0], object_);
  ASSERT_TRUE(old_lock.ok());
  ASSERT_TRUE((*old_lock)->Take().ok());
  SinkInstance forged;
  forged.addr = *clients[1]->ClientAddress();
  forged.pid = 1;
  forged.host = "compute-7";
  RadosKvStore kv(io_, object_);
  ASSERT_TRUE(Catalog(kv).ReplaceSinkInstance(std::nullopt, forged).ok());

  auto new_lock = LockOf(clients[2], object_);
  ASSERT_TRUE(new_lock.ok());
  SinkInstance self;
  self.addr = (*new_lock)->self_addr();
  self.pid = 2;
  auto r =
      FenceAndRegisterSink({{pool, &kv, new_lock->get()}}, self, [&](const SinkInstance& prev) {
        return clients[2]->Blocklist(prev.addr, std::chrono::minutes(10));
      });
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->fenced.size(), 1u);
  EXPECT_EQ(r->fenced[0].instance.addr, (*old_lock)->self_addr());
  ASSERT_EQ(r->warnings.size(), 1u);
  EXPECT_NE(r->warnings[0].find(forged.addr + " (cairnd pid 1 on host compute-7"),
            std::string::npos)
      << r->warnings[0];
  auto fenced = clients[0]->Blocklisted(pool, object_);
  auto hypervisor = clients[1]->Blocklisted(pool, object_);
  ASSERT_TRUE(fenced.ok() && hypervisor.ok());
  EXPECT_TRUE(*fenced) << "the previous sink was not fenced";
  EXPECT_FALSE(*hypervisor) << "the client a forged record named was fenced";
  EXPECT_EQ((*new_lock)->Holders()->at(0).addr, self.addr);
  EXPECT_EQ((*Catalog(kv).SinkInstanceRecord())->instance.addr, self.addr);
}

}  // namespace
}  // namespace cairn
