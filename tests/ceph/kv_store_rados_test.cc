// The KvStore conformance suite over RadosKvStore on a real cluster, plus
// what only RADOS has: durability across clients, key rules.
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

#include "engine/ceph/rados_kv_store.h"
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

}  // namespace
}  // namespace cairn
