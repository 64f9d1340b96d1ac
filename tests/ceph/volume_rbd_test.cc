// The Volume conformance suite over RbdPool on a real cluster, plus what
// only RBD has: connection errors, object-map fallbacks, exact diffs.
//
// Needs a cluster: CAIRN_TEST_CEPH_CONF names its ceph.conf (e.g. the one
// `tests/cluster/testbed.sh start DIR` prints). Optional: CAIRN_TEST_POOL
// (default "rbd"), CAIRN_TEST_CEPH_USER (default "admin"),
// CAIRN_TEST_CEPH_KEYRING (default: the keyring the conf names). Without
// CAIRN_TEST_CEPH_CONF every test fails, saying so: no silent skip.
// Image names start with cairn-test-<pid>- and are removed by each test.
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "engine/catalog/catalog.h"
#include "engine/ceph/omap_read.h"
#include "engine/ceph/rbd_volume.h"
#include "engine/volume/fault_pool.h"
#include "tests/unit/volume/volume_conformance.h"
#include "tests/unit/volume/volume_group_conformance.h"

namespace cairn {
namespace {

using volume_test::CollectDiff;
using volume_test::kMiB;
using volume_test::Pattern;
using volume_test::WriteAt;
using volume_test::ZeroAt;

struct CephTestEnv {
  std::string conf;
  std::string pool;
  std::string user;
  std::string keyring;
};

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? v : fallback;
}

StatusOr<CephTestEnv> TestEnv() {
  CephTestEnv env;
  env.conf = EnvOr("CAIRN_TEST_CEPH_CONF", "");
  if (env.conf.empty()) {
    return FailedPrecondition(
        "CAIRN_TEST_CEPH_CONF is not set: the Ceph tests need a cluster. Start one with "
        "`tests/cluster/testbed.sh start DIR` and set CAIRN_TEST_CEPH_CONF to its ceph.conf "
        "(optional: CAIRN_TEST_POOL, default rbd; CAIRN_TEST_CEPH_USER, default admin; "
        "CAIRN_TEST_CEPH_KEYRING)");
  }
  env.pool = EnvOr("CAIRN_TEST_POOL", "rbd");
  env.user = EnvOr("CAIRN_TEST_CEPH_USER", "admin");
  env.keyring = EnvOr("CAIRN_TEST_CEPH_KEYRING", "");
  return env;
}

// One connection for the whole run.
StatusOr<std::shared_ptr<RbdCluster>> TestCluster() {
  static std::mutex mu;
  static std::shared_ptr<RbdCluster> cluster;
  std::lock_guard lock(mu);
  if (cluster) return cluster;
  ASSIGN_OR_RETURN(CephTestEnv env, TestEnv());
  ASSIGN_OR_RETURN(cluster,
                   RbdCluster::Connect(env.conf, env.user, env.keyring, std::chrono::seconds(20)));
  return cluster;
}

StatusOr<std::shared_ptr<RadosIoCtx>> TestIoCtx() {
  ASSIGN_OR_RETURN(CephTestEnv env, TestEnv());
  ASSIGN_OR_RETURN(std::shared_ptr<RbdCluster> cluster, TestCluster());
  return cluster->OpenIoCtx(env.pool);
}

std::string RunPrefix() { return fmt::format("cairn-test-{}-", getpid()); }

// What an operator does with `rbd group create` and `rbd group image add`.
Status MakeRbdGroup(const RadosIoCtx& io, const std::string& group,
                    const std::vector<std::string>& images) {
  if (int rc = rbd_group_create(io.get(), group.c_str()); rc < 0) {
    return ErrnoStatus(rc, "creating group " + group);
  }
  for (const auto& image : images) {
    if (int rc = rbd_group_image_add(io.get(), group.c_str(), io.get(), image.c_str()); rc < 0) {
      return ErrnoStatus(rc, fmt::format("adding {} to group {}", image, group));
    }
  }
  return OkStatus();
}

// `rbd group remove`: its snapshots and memberships go with it.
Status RemoveRbdGroup(const RadosIoCtx& io, const std::string& group) {
  const int rc = rbd_group_remove(io.get(), group.c_str());
  return rc < 0 ? ErrnoStatus(rc, "removing group " + group) : OkStatus();
}

VolumeConformanceParam RbdParam(std::string label, uint64_t features) {
  return {label, [label, features]() -> StatusOr<VolumeTestTarget> {
            ASSIGN_OR_RETURN(std::shared_ptr<RadosIoCtx> io, TestIoCtx());
            RbdPoolOptions options;
            options.features = features;
            VolumeTestTarget t;
            t.make_group = [io](const std::string& group, const std::vector<std::string>& images) {
              return MakeRbdGroup(*io, group, images);
            };
            t.remove_group = [io](const std::string& group) { return RemoveRbdGroup(*io, group); };
            t.pool = std::make_unique<RbdPool>(std::move(io), options);
            t.diff_granularity = 4 * kMiB;  // the object size
            t.tells_unchanged = (features & RBD_FEATURE_FAST_DIFF) != 0;
            t.name_prefix = RunPrefix() + label + "-";
            return t;
          }};
}

// With fast-diff (the default) and without it (the exact pass over every
// object: the fallback path); and through the fault layer, which must pass
// everything on to librbd as it is.
INSTANTIATE_TEST_SUITE_P(Rbd, VolumeConformanceTest,
                         ::testing::Values(RbdParam("FastDiff", kRbdDefaultFeatures),
                                           RbdParam("NoFastDiff", RBD_FEATURE_LAYERING),
                                           ThroughFaultPool(RbdParam("FastDiff",
                                                                     kRbdDefaultFeatures))),
                         VolumeParamName);

// A file in a fresh temporary directory, removed with it.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "cairn-rbd-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data()) != nullptr ? tmpl : "";
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  std::string Write(const std::string& name, const std::string& text) const {
    const std::string p = path_ + "/" + name;
    std::ofstream(p) << text;
    return p;
  }

 private:
  std::string path_;
};

// A syntactically valid cephx key that no cluster knows.
std::string UnknownKey() {
  static const char* kB64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string raw = {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0};  // type, created, length
  const std::string secret = Pattern(getpid(), 16);
  raw += secret;
  std::string out;
  for (size_t i = 0; i < raw.size(); i += 3) {
    uint32_t n = static_cast<uint8_t>(raw[i]) << 16;
    if (i + 1 < raw.size()) n |= static_cast<uint8_t>(raw[i + 1]) << 8;
    if (i + 2 < raw.size()) n |= static_cast<uint8_t>(raw[i + 2]);
    out += kB64[(n >> 18) & 63];
    out += kB64[(n >> 12) & 63];
    out += i + 1 < raw.size() ? kB64[(n >> 6) & 63] : '=';
    out += i + 2 < raw.size() ? kB64[n & 63] : '=';
  }
  return out;
}

// A loopback port that nothing listens on (bound, then closed).
int ClosedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return 9;  // discard: nothing there either
  }
  close(fd);
  return ntohs(addr.sin_port);
}

class RbdClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StatusOr<CephTestEnv> env = TestEnv();
    ASSERT_TRUE(env.ok()) << env.status().ToString();
    env_ = *env;
  }
  CephTestEnv env_;
};

TEST_F(RbdClusterTest, AMissingPoolIsNotFoundAndNamed) {
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdCluster> cluster, TestCluster());
  const std::string pool = fmt::format("cairn-no-such-pool-{}", getpid());
  const Status s = cluster->OpenPool(pool).status();
  EXPECT_EQ(s.code(), Code::kNotFound) << s.ToString();
  EXPECT_NE(s.message().find("pool " + pool + " does not exist"), std::string::npos)
      << s.ToString();
  EXPECT_NE(s.message().find(env_.conf), std::string::npos) << s.ToString();
  EXPECT_EQ(cluster->OpenKvStore(pool, "cairn.catalog").status().code(), Code::kNotFound);
}

TEST_F(RbdClusterTest, AWrongKeyIsFailedPreconditionNamingUserAndKeyring) {
  TempDir dir;
  const std::string keyring =
      dir.Write("bad.keyring", fmt::format("[client.{}]\n\tkey = {}\n", env_.user, UnknownKey()));
  const auto start = std::chrono::steady_clock::now();
  const Status s =
      RbdCluster::Connect(env_.conf, env_.user, keyring, std::chrono::seconds(10)).status();
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("client." + env_.user), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find(keyring), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("check"), std::string::npos) << s.ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
}

TEST_F(RbdClusterTest, AMissingKeyringIsFailedPrecondition) {
  const std::string keyring = fmt::format("/nonexistent-{}/keyring", getpid());
  const Status s =
      RbdCluster::Connect(env_.conf, env_.user, keyring, std::chrono::seconds(10)).status();
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find(keyring), std::string::npos) << s.ToString();
}

TEST_F(RbdClusterTest, AMissingConfIsFailedPrecondition) {
  const std::string conf = fmt::format("/nonexistent-{}/ceph.conf", getpid());
  const Status s = RbdCluster::Connect(conf).status();
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find(conf), std::string::npos) << s.ToString();
}

TEST_F(RbdClusterTest, AnUnreachableMonitorIsUnavailableWithinTheTimeout) {
  TempDir dir;
  const std::string keyring =
      dir.Write("k.keyring", fmt::format("[client.{}]\n\tkey = {}\n", env_.user, UnknownKey()));
  const std::string conf = dir.Write(
      "dead.conf", fmt::format("[global]\n\tmon host = v2:127.0.0.1:{}\n\tms bind ipv4 = true\n"
                               "\tlog to stderr = false\n\terr to stderr = false\n",
                               ClosedPort()));
  const auto start = std::chrono::steady_clock::now();
  const Status s = RbdCluster::Connect(conf, env_.user, keyring, std::chrono::seconds(3)).status();
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.ToString();
  EXPECT_NE(s.message().find(conf), std::string::npos) << s.ToString();
  EXPECT_LT(elapsed, std::chrono::seconds(15));
}

// RBD-only behaviour, on images named and removed like the suite's.
class RbdVolumeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    StatusOr<std::shared_ptr<RadosIoCtx>> io = TestIoCtx();
    ASSERT_TRUE(io.ok()) << io.status().ToString();
    io_ = *io;
    pool_ = std::make_unique<RbdPool>(io_);
  }
  void TearDown() override {
    if (!pool_) return;
    for (const auto& group : groups_) {
      const Status s = RemoveRbdGroup(*io_, group);
      EXPECT_TRUE(s.ok()) << s.ToString();
    }
    for (auto it = names_.rbegin(); it != names_.rend(); ++it) {
      StatusOr<bool> exists = pool_->Exists(*it);
      if (exists.ok() && *exists) {
        const Status s = pool_->Remove(*it);
        EXPECT_TRUE(s.ok()) << s.ToString();
      }
    }
  }
  std::string NewName(const std::string& hint) {
    static int counter = 0;
    names_.push_back(RunPrefix() + "rbd-" + std::to_string(counter++) + "-" + hint);
    return names_.back();
  }

  // An image of 8 objects of 4 MiB with data in object 5, and snapshot s1
  // of it: its name, a volume of it, and the image as it is at s1.
  struct AtS1 {
    std::string name;
    std::unique_ptr<Volume> v;
    std::string replica;
  };
  StatusOr<AtS1> ImageAtS1(const std::string& hint) {
    AtS1 a;
    a.name = NewName(hint);
    RETURN_IF_ERROR(pool_->Create(a.name, 8 * 4 * kMiB));
    ASSIGN_OR_RETURN(a.v, pool_->Open(a.name));
    RETURN_IF_ERROR(WriteAt(*a.v, 5 * 4 * kMiB, Pattern(1, 4096)));
    RETURN_IF_ERROR(a.v->CreateSnap("s1"));
    ASSIGN_OR_RETURN(a.replica, volume_test::ReadImage(*a.v, "s1"));
    return a;
  }

  // An RBD group of `images`, removed (with its snapshots) by TearDown.
  StatusOr<std::string> NewGroup(const std::string& hint, const std::vector<std::string>& images) {
    static int counter = 0;
    std::string group = RunPrefix() + "group-" + std::to_string(counter++) + "-" + hint;
    RETURN_IF_ERROR(MakeRbdGroup(*io_, group, images));
    groups_.push_back(group);
    return group;
  }

  std::shared_ptr<RadosIoCtx> io_;
  std::unique_ptr<RbdPool> pool_;
  std::vector<std::string> names_;
  std::vector<std::string> groups_;
};

// Between snapshots librbd lists exactly the bytes written or zeroed, but
// says "hole" (kZero) only for objects that are gone (or cut short): zeros
// inside a live object come as kData (and read as zeros).
TEST_F(RbdVolumeTest, DiffBetweenSnapshotsIsByteExact) {
  const std::string name = NewName("exact");
  CAIRN_ASSERT_OK(pool_->Create(name, 16 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(1, 8 * kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(WriteAt(*v, 50, Pattern(2, 10)));
  CAIRN_ASSERT_OK(ZeroAt(*v, kMiB + 4096, 8192));
  CAIRN_ASSERT_OK(ZeroAt(*v, 4 * kMiB, 4 * kMiB));  // a whole object
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, CollectDiff(*v, "s1", "s2"));
  EXPECT_EQ(d, (std::vector<Extent>{{50, 10, RecordKind::kData},
                                    {kMiB + 4096, 8192, RecordKind::kData},
                                    {4 * kMiB, 4 * kMiB, RecordKind::kZero}}))
      << volume_test::Describe(d);
}

// Pacific's fast diff (object maps) forgets the objects a shrink removed if
// a snapshot recorded the shrink and the image then grew back; DiffExtents
// must still list them as holes.
TEST_F(RbdVolumeTest, DiffListsWhatAShrinkInBetweenRemoved) {
  const std::string name = NewName("shrinkgrow");
  CAIRN_ASSERT_OK(pool_->Create(name, 16 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(5, 16 * kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(v->Resize(5 * kMiB + 777));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK(v->Resize(16 * kMiB));
  CAIRN_ASSERT_OK(v->CreateSnap("s3"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, CollectDiff(*v, "s1", "s3"));
  EXPECT_EQ(d, (std::vector<Extent>{{5 * kMiB + 777, 11 * kMiB - 777, RecordKind::kZero}}))
      << volume_test::Describe(d);
  CAIRN_ASSERT_OK_AND_ASSIGN(d, CollectDiff(*v, "s1", ""));
  EXPECT_EQ(d, (std::vector<Extent>{{5 * kMiB + 777, 11 * kMiB - 777, RecordKind::kZero}}))
      << volume_test::Describe(d);
}

// What a client does that opened the image while a snapshot was being taken
// and missed the snapshot's notification (librbd reads the header before it
// starts watching it): it marks the object in the head's object map, then
// writes with the snapshot context it read before. RADOS makes no clone for
// such a write, so it shows under the older snapshots as well.
void WriteWithOutOfDateSnapContext(RbdCluster& cluster, const std::string& pool,
                                   const std::string& image_id, uint64_t object_no, uint64_t offset,
                                   const std::string& data) {
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RadosIoCtx> io, cluster.OpenIoCtx(pool));
  // cls_rbd object_map_update(start, end, new state, no current state).
  std::string arg(18, '\0');
  const uint64_t end = object_no + 1;
  std::memcpy(arg.data(), &object_no, 8);  // little-endian, as the cls encoding
  std::memcpy(arg.data() + 8, &end, 8);
  arg[16] = 1;  // OBJECT_EXISTS
  const std::string map = "rbd_object_map." + image_id;
  ASSERT_EQ(rados_exec(io->get(), map.c_str(), "rbd", "object_map_update", arg.data(), arg.size(),
                       nullptr, 0),
            0);
  ASSERT_EQ(rados_ioctx_selfmanaged_snap_set_write_ctx(io->get(), 0, nullptr, 0), 0);
  const std::string object = fmt::format("rbd_data.{}.{:016x}", image_id, object_no);
  ASSERT_EQ(rados_write(io->get(), object.c_str(), data.data(), data.size(), offset), 0);
}

// The diff s1 -> `s2` of `v`, applied to `replica` (the image at s1), must
// give the image at `s2`, which holds the emulated write at object 2, 65536.
void ExpectDiffRebuildsS2(Volume& v, std::string replica, uint64_t object_size,
                          const std::string& s2 = "s2") {
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, CollectDiff(v, "s1", s2));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string target, volume_test::ReadImage(v, s2));
  ASSERT_TRUE(target.compare(2 * object_size + 65536, 8192, Pattern(12, 8192)) == 0)
      << "the emulated write is not in " << s2;
  for (const auto& e : d) {
    if (e.kind == RecordKind::kData) {
      std::memcpy(replica.data() + e.offset, target.data() + e.offset, e.length);
    } else {
      std::memset(replica.data() + e.offset, 0, e.length);
    }
  }
  for (uint64_t at = 0; at < target.size(); at += object_size) {
    EXPECT_TRUE(replica.compare(at, object_size, target, at, object_size) == 0)
        << "object " << at / object_size
        << " of the replica differs from s2; the diff s1 -> s2: " << volume_test::Describe(d);
  }
}

// A connection of its own, as another process has: this process's own
// watchers do not count as clients that appeared (SettleBook).
struct OtherClient {
  std::shared_ptr<RbdCluster> cluster;
  std::shared_ptr<RadosIoCtx> io;
};
StatusOr<OtherClient> ConnectOtherClient() {
  ASSIGN_OR_RETURN(CephTestEnv env, TestEnv());
  OtherClient c;
  ASSIGN_OR_RETURN(c.cluster,
                   RbdCluster::Connect(env.conf, env.user, env.keyring, std::chrono::seconds(20)));
  ASSIGN_OR_RETURN(c.io, c.cluster->OpenIoCtx(env.pool));
  return c;
}

// The diff from a snapshot to the next must list what such a client wrote
// in between: a replica built from the earlier diff (made before the writes)
// plus this one must equal the later snapshot. Object 2 is new; object 5
// held data before.
TEST_F(RbdVolumeTest, DiffListsWritesMadeWithAnOutOfDateSnapshotContext) {
  constexpr uint64_t kObject = 4 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(AtS1 a, ImageAtS1("stalesnapc"));
  a.v.reset();
  std::string image_id;
  {
    rbd_image_t h = nullptr;
    ASSERT_EQ(rbd_open_read_only(io_->get(), a.name.c_str(), &h, nullptr), 0);
    char id[64] = {};
    EXPECT_EQ(rbd_get_id(h, id, sizeof id), 0);
    rbd_close(h);
    image_id = id;
  }
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdCluster> cluster, TestCluster());
  CAIRN_ASSERT_OK_AND_ASSIGN(CephTestEnv env, TestEnv());
  for (const uint64_t object_no : {2, 5}) {
    WriteWithOutOfDateSnapContext(*cluster, env.pool, image_id, object_no, 65536,
                                  Pattern(10 + object_no, 8192));
  }
  CAIRN_ASSERT_OK_AND_ASSIGN(a.v, pool_->Open(a.name));
  CAIRN_ASSERT_OK(a.v->CreateSnap("s2"));
  ExpectDiffRebuildsS2(*a.v, a.replica, kObject);
}

// A client that opened the image around snapshot s1 writes with the
// context it read (no s1), and then a client that knows of s1 writes to the
// same object: RADOS clones the object for s1 with the first write in it,
// and the exact diff s1 -> s2 lists only the second. Having seen a client
// appear since s1 settled, the diff must send the objects that changed
// whole; a replica built from s1 plus the diff then equals s2.
TEST_F(RbdVolumeTest, DiffSendsChangedObjectsWholeOnceAClientAppearedSinceTheSnapshot) {
  constexpr uint64_t kObject = 4 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(AtS1 a, ImageAtS1("appeared"));
  CAIRN_ASSERT_OK_AND_ASSIGN(OtherClient other, ConnectOtherClient());
  rbd_image_t h = nullptr;
  ASSERT_EQ(rbd_open(other.io->get(), a.name.c_str(), &h, nullptr), 0);
  char id[64] = {};
  ASSERT_EQ(rbd_get_id(h, id, sizeof id), 0);
  WriteWithOutOfDateSnapContext(*other.cluster, other.io->pool(), id, 2, 65536, Pattern(12, 8192));
  const std::string later = Pattern(13, 4096);
  ASSERT_EQ(rbd_write(h, 2 * kObject + kMiB, later.size(), later.data()),
            static_cast<ssize_t>(later.size()));
  CAIRN_ASSERT_OK(a.v->CreateSnap("s2"));  // `h` watches: it appeared since s1
  uint64_t s1 = 0;
  ASSERT_EQ(rbd_snap_get_id(h, "s1", &s1), 0);
  rbd_close(h);
  {
    // RADOS files the stale write under s1 (librbd reads s1's object 2 as
    // zeros: its object map there says "no object").
    std::string got(8192, '\0');
    rados_ioctx_snap_set_read(other.io->get(), s1);
    const std::string object = fmt::format("rbd_data.{}.{:016x}", id, 2);
    ASSERT_EQ(rados_read(other.io->get(), object.c_str(), got.data(), got.size(), 65536), 8192);
    ASSERT_EQ(got, Pattern(12, 8192)) << "the case this test is about did not arise";
  }
  ExpectDiffRebuildsS2(*a.v, a.replica, kObject);
}

// With the same clients as at the snapshot before, the diff stays exact.
TEST_F(RbdVolumeTest, DiffStaysExactWhileTheSameClientsWatch) {
  constexpr uint64_t kObject = 4 * kMiB;
  const std::string name = NewName("samewatchers");
  CAIRN_ASSERT_OK(pool_->Create(name, 8 * kObject));
  CAIRN_ASSERT_OK_AND_ASSIGN(OtherClient other, ConnectOtherClient());
  rbd_image_t h = nullptr;
  ASSERT_EQ(rbd_open(other.io->get(), name.c_str(), &h, nullptr), 0);
  const std::string data = Pattern(3, 4096);
  ASSERT_EQ(rbd_write(h, kObject, data.size(), data.data()), static_cast<ssize_t>(data.size()));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  ASSERT_EQ(rbd_write(h, 2 * kObject, data.size(), data.data()), static_cast<ssize_t>(data.size()));
  // A handle of this process (the source opens its image anew every epoch).
  CAIRN_ASSERT_OK_AND_ASSIGN(v, pool_->Open(name));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  rbd_close(h);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, CollectDiff(*v, "s1", "s2"));
  EXPECT_EQ(d, (std::vector<Extent>{{2 * kObject, 4096, RecordKind::kData}}))
      << volume_test::Describe(d);
}

// Writes that fall in one RADOS object of the head go out as one op after
// the object's first write (rbd_io.cc, ObjectWriter). `pieces` are
// started in order with tags 0..n-1, then collected one WaitOne at a time
// (so the path where only unsent pieces remain is taken too). Checks that
// every tag completes once and OK.
void WritePieces(Volume& v, const std::vector<std::pair<uint64_t, std::string>>& pieces,
                 AsyncIo::WriteStats* stats) {
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v.OpenIo(""));
  for (size_t i = 0; i < pieces.size(); ++i) {
    CAIRN_ASSERT_OK(io->StartWrite(i, pieces[i].first, pieces[i].second));
  }
  std::vector<int> seen(pieces.size(), 0);
  while (io->InFlight() > 0) {
    AsyncIo::Completion c = io->WaitOne();
    ASSERT_LT(c.tag, pieces.size());
    EXPECT_TRUE(c.status.ok()) << c.status.ToString();
    ++seen[c.tag];
  }
  CAIRN_ASSERT_OK(io->Drain());
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_EQ(seen[i], 1) << "tag " << i;
  *stats = io->write_stats();
}

// A new image of `size` bytes, its first `filled` written with a pattern,
// then snapshot `snap`; open at the head.
StatusOr<std::unique_ptr<Volume>> FilledThenSnapshot(Pool& pool, const std::string& name,
                                                     uint64_t size, uint64_t filled,
                                                     const std::string& snap) {
  RETURN_IF_ERROR(pool.Create(name, size));
  ASSIGN_OR_RETURN(std::unique_ptr<Volume> v, pool.Open(name));
  RETURN_IF_ERROR(WriteAt(*v, 0, Pattern(size + filled, filled)));
  RETURN_IF_ERROR(v->CreateSnap(snap));
  return v;
}

// What the sink does with an incremental epoch: several records in one
// object after a snapshot, into objects that held data (object 1), that did
// not exist (object 3), and across two objects (2/3). The head must read
// back what was written, the snapshot must not change, and both diffs
// (fast-diff from the object maps, then exact) must list the writes: the
// object maps must have learnt of every object written.
TEST_F(RbdVolumeTest, WritesToOneObjectGoOutTogetherAndKeepSnapshotsAndDiffsRight) {
  constexpr uint64_t kObject = 4 * kMiB;
  const std::string name = NewName("objwrites");
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v,
                             FilledThenSnapshot(*pool_, name, 4 * kObject, 2 * kObject, "s1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string before, volume_test::ReadImage(*v, "s1"));

  std::vector<std::pair<uint64_t, std::string>> pieces;
  for (uint64_t i = 0; i < 8; ++i) {  // object 1: 8 of 64 KiB, 448 KiB apart
    pieces.push_back({kObject + i * 512 * 1024 + 4096, Pattern(100 + i, 64 * 1024)});
  }
  pieces.push_back({3 * kObject - 8192, Pattern(200, 16384)});  // objects 2 and 3
  for (uint64_t i = 0; i < 3; ++i) {                            // object 3, new
    pieces.push_back({3 * kObject + kMiB * (i + 1), Pattern(300 + i, 100000)});
  }
  AsyncIo::WriteStats stats;
  ASSERT_NO_FATAL_FAILURE(WritePieces(*v, pieces, &stats));
  EXPECT_EQ(stats.writes, pieces.size());
  // Object 1: its first write, then 7 in one op; the crossing write alone;
  // object 3: its first write, then 2 in one op.
  EXPECT_EQ(stats.ops, 5u) << "writes to one object did not go out together";

  std::string want = before;
  for (const auto& [off, data] : pieces) want.replace(off, data.size(), data);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string head, volume_test::ReadImage(*v, ""));
  EXPECT_TRUE(head == want) << "the head does not read back what was written";
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string s1, volume_test::ReadImage(*v, "s1"));
  EXPECT_TRUE(s1 == before) << "writes after snapshot s1 changed it";
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string s2, volume_test::ReadImage(*v, "s2"));
  EXPECT_TRUE(s2 == want);

  // Object 1 held data at s1: its writes byte-exact; objects 2 and 3 are
  // new since s1: listed from their start to the end of their data.
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, CollectDiff(*v, "s1", "s2"));
  std::vector<Extent> expect;
  for (size_t i = 0; i < 8; ++i) {
    expect.push_back({pieces[i].first, pieces[i].second.size(), RecordKind::kData});
  }
  expect.push_back({2 * kObject, kObject + 3 * kMiB + 100000, RecordKind::kData});
  EXPECT_EQ(d, expect) << volume_test::Describe(d);
  // From the empty image: object 3 is listed, from the start of its data.
  CAIRN_ASSERT_OK_AND_ASSIGN(d, CollectDiff(*v, "", "s2"));
  ASSERT_FALSE(d.empty());
  EXPECT_EQ(d.back().offset + d.back().length, 3 * kObject + 3 * kMiB + 100000)
      << volume_test::Describe(d);
  // A fresh handle (object map loaded from the cluster) reads the same.
  v.reset();
  CAIRN_ASSERT_OK_AND_ASSIGN(v, pool_->Open(name));
  CAIRN_ASSERT_OK_AND_ASSIGN(head, volume_test::ReadImage(*v, ""));
  EXPECT_TRUE(head == want) << "a fresh handle reads other bytes";
}

// In a clone, an object the child does not have yet must be copied up from
// the parent before any piece lands in it: pieces that leave the object's
// start unwritten must read back over the parent's bytes, not zeros.
TEST_F(RbdVolumeTest, WritesToOneObjectOfACloneKeepTheParentsBytes) {
  constexpr uint64_t kObject = 4 * kMiB;
  const std::string parent_name = NewName("objparent");
  CAIRN_ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<Volume> parent,
      FilledThenSnapshot(*pool_, parent_name, 2 * kObject, 2 * kObject, "base"));
  const std::string child_name = NewName("objchild");
  CAIRN_ASSERT_OK(pool_->Clone(parent_name, "base", child_name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> child, pool_->Open(child_name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string want, volume_test::ReadImage(*parent, "base"));

  std::vector<std::pair<uint64_t, std::string>> pieces;
  for (uint64_t i = 0; i < 4; ++i) {  // object 1, none at its start
    pieces.push_back({kObject + kMiB * i + 65536, Pattern(400 + i, 65536)});
  }
  AsyncIo::WriteStats stats;
  ASSERT_NO_FATAL_FAILURE(WritePieces(*child, pieces, &stats));
  EXPECT_EQ(stats.ops, 2u);
  for (const auto& [off, data] : pieces) want.replace(off, data.size(), data);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string head, volume_test::ReadImage(*child, ""));
  EXPECT_TRUE(head.compare(kObject, kObject, want, kObject, kObject) == 0)
      << "object 1 of the clone lost its parent's bytes";
  EXPECT_TRUE(head == want);
  child.reset();
  CAIRN_ASSERT_OK(pool_->Remove(child_name));
}

// librbd 16.2 crashes (std::system_error, SIGSEGV) or hangs when image
// contexts are made and dropped in several threads of a process at once;
// cairnd's sources open snapshots of their volumes side by side. Six threads
// open and close handles of their own images for 20 s. Without RbdVolume's
// lock around those calls, 1 of 4 such runs hung in librbd (and a Python
// script doing the same crashed it in 2 of 3 one-minute runs). A hung
// librbd call cannot be undone, so a run that does not end in time fails
// and ends the process.
TEST_F(RbdVolumeTest, ImagesOpenAndCloseInManyThreadsAtOnce) {
  constexpr int kThreads = 6;
  std::vector<std::string> names;
  for (int i = 0; i < kThreads; ++i) {
    names.push_back(NewName("openers"));
    CAIRN_ASSERT_OK(pool_->Create(names.back(), 8 * kMiB));
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(names.back()));
    CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(i, 4096)));
    CAIRN_ASSERT_OK(v->CreateSnap("s"));
  }
  const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  std::vector<Status> failures(kThreads);
  std::vector<uint64_t> opens(kThreads, 0);
  std::mutex done_mu;
  std::condition_variable done_cv;
  int done = 0;
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      while (std::chrono::steady_clock::now() < end && failures[i].ok()) {
        StatusOr<std::unique_ptr<Volume>> v = pool_->Open(names[i]);
        if (!v.ok()) {
          failures[i] = v.status();
          break;
        }
        StatusOr<std::unique_ptr<AsyncIo>> io = (*v)->OpenIo("s");
        failures[i] = io.status();
        opens[i] += 2;
      }
      std::lock_guard lock(done_mu);
      ++done;
      done_cv.notify_all();
    });
  }
  {
    std::unique_lock lock(done_mu);
    if (!done_cv.wait_until(lock, end + std::chrono::seconds(60),
                            [&] { return done == kThreads; })) {
      ADD_FAILURE() << kThreads - done << " thread(s) still inside librbd 60 s after the end";
      std::fflush(nullptr);
      std::_Exit(1);
    }
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < kThreads; ++i) {
    EXPECT_TRUE(failures[i].ok()) << "thread " << i << ": " << failures[i].ToString();
    EXPECT_GT(opens[i], 10u) << "thread " << i << " hardly ran";
  }
}

TEST_F(RbdVolumeTest, DiffIsRightWhenTheObjectMapIsInvalid) {
  const std::string name = NewName("invalidmap");
  CAIRN_ASSERT_OK(pool_->Create(name, 24 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(3, 12 * kMiB)));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  const std::vector<volume_test::Range> changes = {{100, 1000}, {9 * kMiB, 5 * kMiB}};
  CAIRN_ASSERT_OK(WriteAt(*v, changes[0].offset, Pattern(4, changes[0].length)));
  CAIRN_ASSERT_OK(ZeroAt(*v, changes[1].offset, changes[1].length));
  CAIRN_ASSERT_OK(v->CreateSnap("s2"));
  v.reset();
  {
    // Turning the object map off and on again leaves it invalid until rebuilt.
    rbd_image_t h = nullptr;
    ASSERT_EQ(rbd_open(io_->get(), name.c_str(), &h, nullptr), 0);
    const uint64_t maps = RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF;
    EXPECT_EQ(rbd_update_features(h, maps, 0), 0);
    EXPECT_EQ(rbd_update_features(h, maps, 1), 0);
    uint64_t flags = 0;
    EXPECT_EQ(rbd_get_flags(h, &flags), 0);
    EXPECT_NE(flags & RBD_FLAG_OBJECT_MAP_INVALID, 0u) << "the test needs an invalid map";
    rbd_close(h);
  }
  CAIRN_ASSERT_OK_AND_ASSIGN(v, pool_->Open(name));
  EXPECT_TRUE(volume_test::DiffReconstructs(*v, "s1", "s2", changes, 4 * kMiB));
  EXPECT_TRUE(volume_test::DiffReconstructs(*v, "", "s2", {{0, 12 * kMiB}}, 4 * kMiB));
}

TEST_F(RbdVolumeTest, RemoveSnapNamesTheClonesThatPinIt) {
  const std::string parent = NewName("pin");
  const std::string child = NewName("pinchild");
  CAIRN_ASSERT_OK(pool_->Create(parent, 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(parent));
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK(pool_->Clone(parent, "s1", child));
  const Status s = v->RemoveSnap("s1");
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_NE(s.message().find("clone(s) depend on snapshot"), std::string::npos) << s.ToString();
  CAIRN_ASSERT_OK(pool_->Remove(child));
  CAIRN_ASSERT_OK(v->RemoveSnap("s1"));  // unprotects, then removes
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
  EXPECT_TRUE(snaps.empty());
}

// FaultPool (engine/volume/fault_pool.h) stacks on librbd as on memory: a
// faulted read completes with the fault and fills nothing, while the reads
// around it return the image's bytes; a faulted snapshot creation leaves
// no snapshot behind.
TEST_F(RbdVolumeTest, AFaultPoolInjectsFaultsIntoTheRealStore) {
  FaultPool faults(*pool_);
  const std::string name = NewName("fault");
  CAIRN_ASSERT_OK(faults.Create(name, 4 * 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, faults.Open(name));
  const std::string data = Pattern(7, 3 * kMiB);
  CAIRN_ASSERT_OK(WriteAt(*v, 4 * kMiB, data));
  faults.SetFault([](const VolumeFaultPoint& p) {
    if (p.op == VolumeOp::kRead && p.offset == 5 * kMiB) return DataLoss("injected bad sector");
    if (p.op == VolumeOp::kCreateSnap) return Unavailable("injected: no answer from the monitors");
    return OkStatus();
  });

  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo(""));
  std::vector<std::string> bufs(3, std::string(kMiB, 'x'));
  for (uint64_t i = 0; i < 3; ++i) {
    CAIRN_ASSERT_OK(io->StartRead(i, (4 + i) * kMiB, std::span<char>(bufs[i])));
  }
  EXPECT_EQ(io->InFlight(), 3u);
  std::vector<Status> done(3, Internal("no completion"));
  for (int i = 0; i < 3; ++i) {
    AsyncIo::Completion c = io->WaitOne();  // in any order on RBD
    ASSERT_LT(c.tag, 3u);
    done[c.tag] = c.status;
  }
  CAIRN_ASSERT_OK(io->Drain());
  CAIRN_EXPECT_OK(done[0]);
  EXPECT_EQ(done[1].ToString(), fmt::format("DataLoss: reading {}/{} at {}~{}: injected bad sector",
                                            pool_->name(), name, 5 * kMiB, kMiB));
  CAIRN_EXPECT_OK(done[2]);
  EXPECT_TRUE(bufs[0] == data.substr(0, kMiB)) << "the read before the fault";
  EXPECT_TRUE(bufs[1] == std::string(kMiB, 'x')) << "the faulted read filled its buffer";
  EXPECT_TRUE(bufs[2] == data.substr(2 * kMiB)) << "the read after the fault";

  const Status snap = v->CreateSnap("s1");
  EXPECT_EQ(snap.ToString(), "Unavailable: injected: no answer from the monitors");
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> direct, pool_->Open(name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, direct->ListSnaps());
  EXPECT_TRUE(snaps.empty()) << snaps.size() << " snapshot(s), the first " << snaps[0].name;
  faults.SetFault(nullptr);
  CAIRN_ASSERT_OK(v->CreateSnap("s1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(snaps, direct->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  EXPECT_EQ(snaps[0].name, "s1");
}

TEST_F(RbdVolumeTest, ReadsAtASnapshotSeeItsSizeNotTheHeads) {
  const std::string name = NewName("snapsize");
  CAIRN_ASSERT_OK(pool_->Create(name, 8 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  CAIRN_ASSERT_OK(v->CreateSnap("small"));
  CAIRN_ASSERT_OK(v->Resize(16 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<AsyncIo> io, v->OpenIo("small"));
  std::string buf(4096, '\0');
  CAIRN_EXPECT_CODE(io->StartRead(1, 12 * kMiB, std::span<char>(buf)), Code::kInvalidArgument);
  CAIRN_ASSERT_OK(io->StartRead(2, 8 * kMiB - 4096, std::span<char>(buf)));
  AsyncIo::Completion c = io->WaitOne();
  EXPECT_EQ(c.tag, 2u);
  EXPECT_TRUE(c.status.ok()) << c.status.ToString();
}

// --- fencing: what a restarted sink does to the instance before it --------

// The addresses of the clients watching pool/image.
std::vector<std::string> Watchers(const RadosIoCtx& io, const std::string& image) {
  std::vector<std::string> out;
  rbd_image_t h = nullptr;
  if (rbd_open_read_only(io.get(), image.c_str(), &h, nullptr) < 0) return {"<open failed>"};
  size_t max = 8;
  std::vector<rbd_image_watcher_t> w(max);
  if (rbd_watchers_list(h, w.data(), &max) == 0) {
    for (size_t i = 0; i < max; ++i) out.emplace_back(w[i].addr);
    rbd_watchers_list_cleanup(w.data(), max);
  } else {
    out.push_back("<list failed>");
  }
  rbd_close(h);
  return out;
}

// Runs a mon command as the test user; its output, or the error.
StatusOr<std::string> MonCommand(RbdCluster& cluster, const std::string& json) {
  const char* cmd[] = {json.c_str()};
  char* out = nullptr;
  size_t out_len = 0;
  char* status = nullptr;
  size_t status_len = 0;
  const int rc =
      rados_mon_command(cluster.handle(), cmd, 1, "", 0, &out, &out_len, &status, &status_len);
  std::string result(out != nullptr ? out : "", out_len);
  std::string why(status != nullptr ? status : "", status_len);
  rados_buffer_free(out);
  rados_buffer_free(status);
  if (rc < 0) return ErrnoStatus(rc, json + ": " + why);
  return result;
}

// A cephx user with the given mon caps (osd 'profile rbd'), connected;
// removed again by the destructor.
class TestUser {
 public:
  TestUser(std::shared_ptr<RbdCluster> admin, const CephTestEnv& env, const std::string& mon_caps)
      : admin_(std::move(admin)), name_(fmt::format("cairn-test-{}-{}", getpid(), counter_++)) {
    auto keyring = MonCommand(
        *admin_, fmt::format(R"({{"prefix": "auth get-or-create", "entity": "client.{}", )"
                             R"("caps": ["mon", "{}", "osd", "profile rbd"]}})",
                             name_, mon_caps));
    if (!keyring.ok()) {
      status_ = keyring.status();
      return;
    }
    const std::string path = dir_.Write("user.keyring", *keyring);
    auto c = RbdCluster::Connect(env.conf, name_, path, std::chrono::seconds(20));
    status_ = c.status();
    if (c.ok()) cluster = *c;
  }
  ~TestUser() {
    cluster.reset();
    (void)MonCommand(*admin_,
                     fmt::format(R"({{"prefix": "auth rm", "entity": "client.{}"}})", name_));
  }
  Status status() const { return status_; }

  std::shared_ptr<RbdCluster> cluster;

 private:
  static inline int counter_ = 0;
  std::shared_ptr<RbdCluster> admin_;
  const std::string name_;
  TempDir dir_;
  Status status_;
};

TEST_F(RbdVolumeTest, BlocklistingAHolderDropsItsWatchAtOnce) {
  CAIRN_ASSERT_OK_AND_ASSIGN(CephTestEnv env, TestEnv());
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdCluster> mine, TestCluster());
  // Another client (a sink that is about to die) writes the image: it holds
  // a watch and the exclusive lock.
  CAIRN_ASSERT_OK_AND_ASSIGN(
      std::shared_ptr<RbdCluster> other,
      RbdCluster::Connect(env.conf, env.user, env.keyring, std::chrono::seconds(20)));
  const std::string name = NewName("fenced");
  CAIRN_ASSERT_OK(pool_->Create(name, 8 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdPool> other_pool, other->OpenPool(env.pool));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> held, other_pool->Open(name));
  CAIRN_ASSERT_OK(WriteAt(*held, 0, Pattern(3, 4096)));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string other_addr, other->ClientAddress());
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string my_addr, mine->ClientAddress());
  EXPECT_NE(other_addr, my_addr);
  // The address is the one the OSDs list: what a blocklist entry must name.
  EXPECT_EQ(Watchers(*io_, name), std::vector<std::string>{other_addr});
  CAIRN_ASSERT_OK_AND_ASSIGN(bool fenced, other->Blocklisted(env.pool, kCatalogObject));
  EXPECT_FALSE(fenced);

  const auto start = std::chrono::steady_clock::now();
  CAIRN_ASSERT_OK(mine->Blocklist(other_addr, std::chrono::seconds(600)));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  EXPECT_TRUE(Watchers(*io_, name).empty()) << "the watch outlived the blocklist";
  CAIRN_ASSERT_OK_AND_ASSIGN(fenced, other->Blocklisted(env.pool, kCatalogObject));
  EXPECT_TRUE(fenced);
  CAIRN_ASSERT_OK_AND_ASSIGN(fenced, mine->Blocklisted(env.pool, kCatalogObject));
  EXPECT_FALSE(fenced);
  // The fenced client can write no more; this one writes and snapshots
  // without waiting for the dead holder's lock.
  EXPECT_FALSE(WriteAt(*held, 4096, Pattern(4, 4096)).ok());
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  const auto t = std::chrono::steady_clock::now();
  CAIRN_ASSERT_OK(WriteAt(*v, 8192, Pattern(5, 4096)));
  CAIRN_ASSERT_OK(v->CreateSnap("after-fence"));
  EXPECT_LT(std::chrono::steady_clock::now() - t, std::chrono::seconds(10));
  held.reset();
  v.reset();
}

TEST_F(RbdClusterTest, BlocklistRefusesWhatIsNotAClientAddress) {
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdCluster> cluster, TestCluster());
  const Status s = cluster->Blocklist("not-an-address", std::chrono::seconds(1));
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find("not-an-address"), std::string::npos) << s.ToString();
}

// The caps docs/OPERATIONS.md asks for are enough, and without them the
// error names what is missing.
TEST_F(RbdClusterTest, ProfileRbdMayBlocklistAndWithoutItTheErrorNamesTheCap) {
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdCluster> admin, TestCluster());
  // An address no client has (TEST-NET-1), for one second.
  const std::string nobody = "192.0.2.1:0/1";
  TestUser rbd_user(admin, env_, "profile rbd");
  if (rbd_user.status().code() == Code::kFailedPrecondition) {
    GTEST_SKIP() << "client." << env_.user
                 << " may not create users here: " << rbd_user.status().ToString();
  }
  CAIRN_ASSERT_OK(rbd_user.status());
  CAIRN_ASSERT_OK(rbd_user.cluster->Blocklist(nobody, std::chrono::seconds(1)));

  TestUser read_only(admin, env_, "allow r");
  CAIRN_ASSERT_OK(read_only.status());
  const Status s = read_only.cluster->Blocklist(nobody, std::chrono::seconds(1));
  EXPECT_EQ(s.code(), Code::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("mon cap 'profile rbd'"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("osd blocklist"), std::string::npos) << s.ToString();
}

// --- group snapshots -------------------------------------------------------------

// librbd's own view of the image's snapshots: (name, namespace) in id order.
std::vector<std::pair<std::string, rbd_snap_namespace_type_t>> RawSnaps(const RadosIoCtx& io,
                                                                        const std::string& image) {
  std::vector<std::pair<std::string, rbd_snap_namespace_type_t>> out;
  rbd_image_t h = nullptr;
  if (rbd_open_read_only(io.get(), image.c_str(), &h, nullptr) < 0) return {{"<open failed>", {}}};
  std::vector<rbd_snap_info_t> snaps(16);
  int max = static_cast<int>(snaps.size());
  const int n = rbd_snap_list(h, snaps.data(), &max);
  for (int i = 0; i < n; ++i) {
    rbd_snap_namespace_type_t type{};
    rbd_snap_get_namespace_type(h, snaps[i].id, &type);
    out.emplace_back(snaps[i].name, type);
  }
  if (n >= 0) rbd_snap_list_end(snaps.data());
  rbd_close(h);
  return out;
}

// The operator's case: two images in an RBD group, each with a user snapshot
// from an earlier epoch; the group snapshot reads the instant, the diff from
// the user snapshot to it is exact, and it goes from both with the group's.
TEST_F(RbdVolumeTest, AGroupSnapshotOfTwoImagesReadsDiffsAndGoes) {
  const std::string a = NewName("group-a");
  const std::string b = NewName("group-b");
  CAIRN_ASSERT_OK(pool_->Create(a, 16 * kMiB));
  CAIRN_ASSERT_OK(pool_->Create(b, 16 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> va, pool_->Open(a));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> vb, pool_->Open(b));
  CAIRN_ASSERT_OK(WriteAt(*va, 0, Pattern(1, 8 * kMiB)));
  CAIRN_ASSERT_OK(WriteAt(*vb, 4 * kMiB, Pattern(2, 4 * kMiB)));
  CAIRN_ASSERT_OK(va->CreateSnap("s0"));
  CAIRN_ASSERT_OK(vb->CreateSnap("s0"));
  CAIRN_ASSERT_OK(WriteAt(*va, 100, Pattern(3, 4096)));
  CAIRN_ASSERT_OK(ZeroAt(*va, 4 * kMiB, 4 * kMiB));  // a whole object
  CAIRN_ASSERT_OK(WriteAt(*vb, 4 * kMiB + 4096, Pattern(4, 8192)));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("pair", {a, b}));
  CAIRN_ASSERT_OK(pool_->CreateGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK(WriteAt(*va, 100, Pattern(5, 4096)));
  CAIRN_ASSERT_OK(WriteAt(*vb, 12 * kMiB, Pattern(6, 4096)));

  const std::string share = GroupSnapName("g1");
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got, volume_test::ReadAt(*va, share, 100, 4096));
  EXPECT_TRUE(got == Pattern(3, 4096));
  CAIRN_ASSERT_OK_AND_ASSIGN(got, volume_test::ReadAt(*vb, share, 4 * kMiB + 4096, 8192));
  EXPECT_TRUE(got == Pattern(4, 8192));
  CAIRN_ASSERT_OK_AND_ASSIGN(got, volume_test::ReadAt(*vb, share, 12 * kMiB, 4096));
  EXPECT_EQ(got, std::string(4096, '\0'));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<Extent> d, CollectDiff(*va, "s0", share));
  EXPECT_EQ(d, (std::vector<Extent>{{100, 4096, RecordKind::kData},
                                    {4 * kMiB, 4 * kMiB, RecordKind::kZero}}))
      << volume_test::Describe(d);
  CAIRN_ASSERT_OK_AND_ASSIGN(d, CollectDiff(*vb, "s0", share));
  EXPECT_EQ(d, (std::vector<Extent>{{4 * kMiB + 4096, 8192, RecordKind::kData}}))
      << volume_test::Describe(d);

  for (Volume* v : {va.get(), vb.get()}) {
    SCOPED_TRACE(v->name());
    CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, v->ListSnaps());
    ASSERT_EQ(snaps.size(), 2u);
    EXPECT_EQ(snaps[0].name, "s0");
    EXPECT_EQ(snaps[1].name, share);
    CAIRN_EXPECT_OK(v->ConfirmSnap(share, snaps[1].id));
    // librbd lists the share under its own name, in the group namespace.
    const auto raw = RawSnaps(*io_, v->name());
    ASSERT_EQ(raw.size(), 2u);
    EXPECT_EQ(raw[1].first.rfind(".group.", 0), 0u) << raw[1].first;
    EXPECT_EQ(raw[1].second, RBD_SNAP_NAMESPACE_TYPE_GROUP);
  }
  // Nor is the image removed from under its group, or with a user
  // snapshot gone before librbd refuses.
  vb->CloseHandles();
  const Status removed = pool_->Remove(b);
  EXPECT_EQ(removed.code(), Code::kFailedPrecondition) << removed.ToString();
  EXPECT_NE(removed.message().find("group"), std::string::npos) << removed.ToString();
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> left, vb->ListSnaps());
  EXPECT_EQ(left.size(), 2u);
  // Out of the group, it still holds its share: librbd would refuse too.
  ASSERT_EQ(rbd_group_image_remove(io_->get(), group.c_str(), io_->get(), b.c_str()), 0);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> members, pool_->GroupImages(group));
  EXPECT_EQ(members, std::vector<std::string>{a});
  const Status holding = pool_->Remove(b);
  EXPECT_EQ(holding.code(), Code::kFailedPrecondition) << holding.ToString();
  EXPECT_NE(holding.message().find("share of a group snapshot"), std::string::npos)
      << holding.ToString();
  CAIRN_ASSERT_OK_AND_ASSIGN(left, vb->ListSnaps());
  EXPECT_EQ(left.size(), 2u);

  // The group snapshot goes from the images it was taken of, members or not.
  CAIRN_ASSERT_OK(pool_->RemoveGroupSnap(group, "g1"));
  for (Volume* v : {va.get(), vb.get()}) {
    const auto raw = RawSnaps(*io_, v->name());
    ASSERT_EQ(raw.size(), 1u) << v->name();
    EXPECT_EQ(raw[0].first, "s0");
  }
}

// The omap of `object`: key -> value (what `rados listomapvals` shows).
std::map<std::string, std::string> OmapOf(const RadosIoCtx& io, const std::string& object) {
  std::map<std::string, std::string> out;
  OmapRead r;
  unsigned char more = 0;
  int prval = 0;
  rados_read_op_omap_get_vals2(r.op, "", "", 1000, &r.iter, &more, &prval);
  if (rados_read_op_operate(r.op, io.get(), object.c_str(), 0) < 0 || prval < 0) return out;
  r.ForEachValue([&](std::string_view k, std::string_view v) {
    out.emplace(k, v);
    return true;
  });
  return out;
}

Status SetOmap(const RadosIoCtx& io, const std::string& object, const std::string& key,
               const std::string& value) {
  rados_write_op_t op = rados_create_write_op();
  const char* keys[] = {key.c_str()};
  const char* values[] = {value.data()};
  const size_t key_lens[] = {key.size()};
  const size_t value_lens[] = {value.size()};
  rados_write_op_omap_set2(op, keys, values, key_lens, value_lens, 1);
  const int rc = rados_write_op_operate(op, io.get(), object.c_str(), nullptr, 0);
  rados_release_write_op(op);
  return rc < 0 ? ErrnoStatus(rc, "setting omap of " + object) : OkStatus();
}

// A group header Cairn cannot decode (a newer Ceph's format, or damage)
// costs the listing its shares only: the image's own snapshots are still
// listed and it replicates on; the group's own operations fail, saying so.
TEST_F(RbdVolumeTest, AGroupHeaderThatDoesNotDecodeLeavesOnlyItsSharesOutOfTheListing) {
  const std::string a = NewName("undecodable");
  CAIRN_ASSERT_OK(pool_->Create(a, 4 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> va, pool_->Open(a));
  CAIRN_ASSERT_OK(va->CreateSnap("s0"));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("undecodable", {a}));
  CAIRN_ASSERT_OK(pool_->CreateGroupSnap(group, "g1"));
  const auto directory = OmapOf(*io_, "rbd_group_directory");
  const auto id = directory.find("name_" + group);
  ASSERT_NE(id, directory.end()) << "group " << group << " is not in rbd_group_directory";
  ASSERT_GT(id->second.size(), 4u);
  const std::string header = "rbd_group_header." + id->second.substr(4);  // after its length
  std::string key, original;
  for (const auto& [k, v] : OmapOf(*io_, header)) {
    if (k.rfind("snapshot_", 0) == 0) std::tie(key, original) = std::tie(k, v);
  }
  ASSERT_FALSE(key.empty()) << header << " holds no snapshot record";
  CAIRN_ASSERT_OK(SetOmap(*io_, header, key, "\x01"));  // a record cut short

  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<SnapInfo> snaps, va->ListSnaps());
  ASSERT_EQ(snaps.size(), 1u);
  EXPECT_EQ(snaps[0].name, "s0");
  const auto listed = pool_->GroupSnaps(group);
  EXPECT_EQ(listed.status().code(), Code::kDataLoss) << listed.status().ToString();
  EXPECT_NE(listed.status().message().find("does not decode"), std::string::npos)
      << listed.status().ToString();

  CAIRN_ASSERT_OK(SetOmap(*io_, header, key, original));  // TearDown removes the group
  CAIRN_ASSERT_OK_AND_ASSIGN(snaps, va->ListSnaps());
  EXPECT_EQ(snaps.size(), 2u);
}

// A client that has a member open and writes (holding its exclusive lock:
// a guest) goes on writing across the group snapshot, which librbd takes
// by asking it for the lock; the share holds its writes up to then.
TEST_F(RbdVolumeTest, AGroupSnapshotTakesTheLockFromAWritingClientAndGivesItBack) {
  const std::string name = NewName("group-guest");
  CAIRN_ASSERT_OK(pool_->Create(name, 8 * kMiB));
  CAIRN_ASSERT_OK_AND_ASSIGN(OtherClient guest, ConnectOtherClient());
  rbd_image_t h = nullptr;
  ASSERT_EQ(rbd_open(guest.io->get(), name.c_str(), &h, nullptr), 0);
  const std::string first = Pattern(40, 4096);
  ASSERT_EQ(rbd_write(h, 0, first.size(), first.data()), static_cast<ssize_t>(first.size()));
  int owner = 0;
  ASSERT_EQ(rbd_is_exclusive_lock_owner(h, &owner), 0);
  EXPECT_EQ(owner, 1);
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("guest", {name}));
  const auto start = std::chrono::steady_clock::now();
  CAIRN_ASSERT_OK(pool_->CreateGroupSnap(group, "g1"));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
  const std::string second = Pattern(41, 4096);
  ASSERT_EQ(rbd_write(h, 0, second.size(), second.data()), static_cast<ssize_t>(second.size()));
  ASSERT_EQ(rbd_flush(h), 0);
  rbd_close(h);
  CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::string got,
                             volume_test::ReadAt(*v, GroupSnapName("g1"), 0, 4096));
  EXPECT_TRUE(got == first);
  CAIRN_ASSERT_OK_AND_ASSIGN(got, volume_test::ReadAt(*v, "", 0, 4096));
  EXPECT_TRUE(got == second);
}

// As DiffSendsChangedObjectsWholeOnceAClientAppearedSinceTheSnapshot, with
// a group snapshot as s2: its shares are settled as CreateSnap's snapshots.
TEST_F(RbdVolumeTest, DiffToAGroupSnapshotSendsChangedObjectsWholeOnceAClientAppeared) {
  constexpr uint64_t kObject = 4 * kMiB;
  CAIRN_ASSERT_OK_AND_ASSIGN(AtS1 a, ImageAtS1("group-appeared"));
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("appeared", {a.name}));
  CAIRN_ASSERT_OK_AND_ASSIGN(OtherClient other, ConnectOtherClient());
  rbd_image_t h = nullptr;
  ASSERT_EQ(rbd_open(other.io->get(), a.name.c_str(), &h, nullptr), 0);
  char id[64] = {};
  ASSERT_EQ(rbd_get_id(h, id, sizeof id), 0);
  WriteWithOutOfDateSnapContext(*other.cluster, other.io->pool(), id, 2, 65536, Pattern(12, 8192));
  const std::string later = Pattern(13, 4096);
  ASSERT_EQ(rbd_write(h, 2 * kObject + kMiB, later.size(), later.data()),
            static_cast<ssize_t>(later.size()));
  CAIRN_ASSERT_OK(pool_->CreateGroupSnap(group, "g2"));  // `h` watches: it appeared since s1
  rbd_close(h);
  ExpectDiffRebuildsS2(*a.v, a.replica, kObject, GroupSnapName("g2"));
}

// The caps docs/OPERATIONS.md asks for (mon and osd 'profile rbd') are
// enough to take, list, read and remove group snapshots.
TEST_F(RbdVolumeTest, ProfileRbdMayTakeReadAndRemoveGroupSnapshots) {
  CAIRN_ASSERT_OK_AND_ASSIGN(CephTestEnv env, TestEnv());
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdCluster> admin, TestCluster());
  TestUser user(admin, env, "profile rbd");
  if (user.status().code() == Code::kFailedPrecondition) {
    GTEST_SKIP() << "client." << env.user
                 << " may not create users here: " << user.status().ToString();
  }
  CAIRN_ASSERT_OK(user.status());
  const std::string name = NewName("group-caps");
  CAIRN_ASSERT_OK(pool_->Create(name, 4 * kMiB));
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool_->Open(name));
    CAIRN_ASSERT_OK(WriteAt(*v, 0, Pattern(50, 4096)));
  }
  CAIRN_ASSERT_OK_AND_ASSIGN(const std::string group, NewGroup("caps", {name}));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::shared_ptr<RbdPool> pool, user.cluster->OpenPool(env.pool));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> images, pool->GroupImages(group));
  EXPECT_EQ(images, std::vector<std::string>{name});
  CAIRN_ASSERT_OK(pool->CreateGroupSnap(group, "g1"));
  CAIRN_ASSERT_OK_AND_ASSIGN(std::vector<std::string> snaps, pool->GroupSnaps(group));
  EXPECT_EQ(snaps, std::vector<std::string>{"g1"});
  {
    CAIRN_ASSERT_OK_AND_ASSIGN(std::unique_ptr<Volume> v, pool->Open(name));
    CAIRN_ASSERT_OK_AND_ASSIGN(std::string got,
                               volume_test::ReadAt(*v, GroupSnapName("g1"), 0, 4096));
    EXPECT_TRUE(got == Pattern(50, 4096));
  }
  CAIRN_ASSERT_OK(pool->RemoveGroupSnap(group, "g1"));
}

}  // namespace
}  // namespace cairn
