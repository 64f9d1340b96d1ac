#include "engine/daemon/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace cairn {
namespace {

using ::testing::HasSubstr;

// A source's links: mutual TLS with these files (not read by ParseConfig).
const std::string kTls =
    "[tls]\nca = /etc/cairn/ca.pem\ncert = /etc/cairn/b.pem\nkey = /etc/cairn/b.key\n";
// A sink's: the same, and a grant to site a's source.
const std::string kSinkSecure = kTls + "[peer site-a]\nsite = a\n";

TEST(Config, FullExample) {
  auto c = ParseConfig(R"(
[cairnd]
site = a
control_socket = /tmp/a.sock
log_level = debug

[ceph]
conf = /etc/ceph/a.conf
client = client.cairn

[sink]
listen = 0.0.0.0:7411
spool_dir = /var/spool/cairn
pools = rbd, volumes

[volume vol1]
pool = volumes
image = volume-1234
peer = 10.0.0.2:7410
interval = 1s
keep_snapshots = 3
block_size = 512K
peer_name = site-b.example

[tls]
ca = /etc/cairn/ca.pem
cert = /etc/cairn/a.pem
key = /etc/cairn/a.key

[peer site-b]
site = b
pools = volumes
volumes = volume-*, vol1
)",
                       "test.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->site, "a");
  EXPECT_EQ(c->ceph.client, "cairn");
  ASSERT_TRUE(c->sink.has_value());
  EXPECT_EQ(c->sink->listen_port, 7411);
  EXPECT_EQ(c->sink->pools, (std::vector<std::string>{"rbd", "volumes"}));
  ASSERT_EQ(c->volumes.size(), 1u);
  const auto& v = c->volumes[0];
  EXPECT_EQ(v.id, "vol1");
  EXPECT_EQ(v.target_pool, "volumes");
  EXPECT_EQ(v.target_image, "volume-1234");
  EXPECT_EQ(v.interval.count(), 1000);
  EXPECT_EQ(v.keep_snapshots, 3u);
  EXPECT_EQ(v.block_size, 512u * 1024);
  EXPECT_EQ(v.peer_host, "10.0.0.2");
  EXPECT_EQ(v.peer_name, "site-b.example");
  EXPECT_FALSE(c->tls.insecure);
  EXPECT_EQ(c->tls.files.key, "/etc/cairn/a.key");
  ASSERT_EQ(c->peers.size(), 1u);
  EXPECT_EQ(c->peers[0].name, "site-b");
  EXPECT_EQ(c->peers[0].site, "b");
  EXPECT_EQ(c->peers[0].pools, (std::vector<std::string>{"volumes"}));
  EXPECT_EQ(c->peers[0].volumes, (std::vector<std::string>{"volume-*", "vol1"}));
}

std::string Error(const std::string& text) {
  auto c = ParseConfig(text, "f.conf");
  EXPECT_FALSE(c.ok());
  return c.status().message();
}

TEST(Config, ErrorsNameWhatIsWrong) {
  EXPECT_THAT(Error("[sink]\nlisten = 1.2.3.4\n"),
              HasSubstr("[sink] listen: '1.2.3.4' is not host:port"));
  EXPECT_THAT(Error("[sink]\nlisen = 1.2.3.4:1\n"), HasSubstr("[sink] has unknown key 'lisen'"));
  EXPECT_THAT(Error("[volume v]\nimage = i\n"), HasSubstr("[volume v] needs 'peer'"));
  EXPECT_THAT(Error("[volume v]\npeer = h:1\n"), HasSubstr("[volume v] needs 'image'"));
  EXPECT_THAT(Error("[volume v]\nimage=i\npeer=h:1\ninterval=500ms\n"),
              HasSubstr("interval: must be at least 1s"));
  EXPECT_THAT(Error("[volume v]\nimage=i\npeer=h:1\ninterval=5x\n"),
              HasSubstr("is not a duration"));
  EXPECT_THAT(Error("[volume a/b]\nimage=i\npeer=h:1\n"), HasSubstr("has '/'"));
  EXPECT_THAT(Error("[sinks]\nlisten = h:1\n"), HasSubstr("unknown section [sinks]"));
  EXPECT_THAT(Error("[cairnd]\nsite = a\n"), HasSubstr("nothing to do"));
  EXPECT_THAT(Error("[cairnd]\nlog_level = loud\n[sink]\n"), HasSubstr("log_level 'loud'"));
  EXPECT_THAT(Error("[sink]\npools = ,\n"), HasSubstr("lists no pool"));
  EXPECT_THAT(Error("[sink]\nlisten = h:1\nlisten = h:2\n"), HasSubstr("set twice"));
  EXPECT_THAT(Error("no section line\n"), HasSubstr("not INI syntax"));
  EXPECT_THAT(Error("[volume a]\nimage=i\npeer=h:1\n[volume b]\nimage=i\npeer=h:1\n"),
              HasSubstr("both replicate into rbd/i"));
  EXPECT_THAT(Error("[volume v]\nimage=i\npeer=h:1\nblock_size=17592186044417M\n"),
              HasSubstr("too large"));
  EXPECT_THAT(Error("[volume v]\nimage=i\npeer=h:1\ninterval=5124095576030432h\n"),
              HasSubstr("too long"));
}

TEST(Config, GroupMembersShareOnePoolAndPeer) {
  auto c = ParseConfig(
      "[tls]\ninsecure = true\n"
      "[volume data]\nimage = d\npeer = h:1\ngroup = db1\n"
      "[volume log]\nimage = l\npeer = h:1\ngroup = db1\n",
      "cairnd.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->volumes[0].group, "db1");
  EXPECT_EQ(c->volumes[1].group, "db1");
  EXPECT_THAT(Error("[volume data]\nimage = d\npeer = h:1\ngroup = db1\n"
                    "[volume log]\npool = other\nimage = l\npeer = h:1\ngroup = db1\n"),
              HasSubstr("are both in group db1, but not in one pool"));
  EXPECT_THAT(Error("[volume v]\nimage = i\npeer = h:1\ngroup = a/b\n"),
              HasSubstr("[volume v] group:"));
}

TEST(Config, MissingFile) {
  auto c = LoadConfig("/nonexistent/cairnd.conf");
  EXPECT_EQ(c.status().code(), Code::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr("/nonexistent/cairnd.conf"));
}

TEST(Config, Durations) {
  EXPECT_EQ(ParseDuration("0")->count(), 0);
  EXPECT_EQ(ParseDuration("250ms")->count(), 250);
  EXPECT_EQ(ParseDuration("2m")->count(), 120000);
  EXPECT_FALSE(ParseDuration("5").ok());
  EXPECT_EQ(*ParseSize("64K"), 65536u);
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

TEST(Config, LongNamesAreRefusedNotTruncated) {
  const std::string id(50, 'v');
  auto c = ParseConfig("[volume " + id + "]\nimage = i\npeer = h:1\n", "f.conf");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), ::testing::HasSubstr("f.conf:1: section name is longer"));
  auto d = ParseConfig("[sink]\nspool_dir = /" + std::string(250, 'x') + "\n", "f.conf");
  EXPECT_THAT(d.status().message(), ::testing::HasSubstr("f.conf:2: line is longer"));
  const std::string ok_id(42, 'v');
  EXPECT_TRUE(ParseConfig(kTls + "[volume " + ok_id + "]\nimage = i\npeer = h:1\n", "f.conf").ok());
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

TEST(Config, CephOpTimeout) {
  const std::string sink = kSinkSecure + "[sink]\npools = rbd\n";
  auto d = ParseConfig(sink, "f.conf");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->ceph.op_timeout, std::chrono::seconds(30));
  auto c = ParseConfig("[ceph]\nop_timeout = 5s\n" + sink, "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->ceph.op_timeout, std::chrono::seconds(5));
  EXPECT_EQ(ParseConfig("[ceph]\nop_timeout = 2m\n" + sink, "f.conf")->ceph.op_timeout,
            std::chrono::seconds(120));
  for (const char* bad : {"0", "500ms", "1500ms", "2h"}) {
    SCOPED_TRACE(bad);
    EXPECT_THAT(Error(std::string("[ceph]\nop_timeout = ") + bad + "\n" + sink),
                HasSubstr("f.conf: [ceph] op_timeout: must be whole seconds from 1s to 1h"));
  }
  EXPECT_THAT(Error("[ceph]\nop_timeout = soon\n" + sink), HasSubstr("is not a duration"));
}

TEST(Config, SpoolMaxBytes) {
  auto max = [](const std::string& value) {
    auto c = ParseConfig(kSinkSecure + "[sink]\npools = rbd\n" + value, "f.conf");
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    return c.ok() ? c->sink->spool_max_bytes : ~0ull;
  };
  EXPECT_EQ(max(""), 0u);
  EXPECT_EQ(max("spool_max_bytes = 20G\n"), 20ull << 30);
  EXPECT_EQ(max("spool_max_bytes = 0\n"), 0u);
  EXPECT_THAT(Error(kSinkSecure + "[sink]\npools = rbd\nspool_max_bytes = 64K\n"),
              HasSubstr("[sink] spool_max_bytes: must be 0 (no limit) or at least 1M"));
  EXPECT_THAT(Error(kSinkSecure + "[sink]\npools = rbd\nspool_max_bytes = lots\n"),
              HasSubstr("is not a size"));
}

TEST(Config, VolumeReadsWholeObjectsByDefault) {
  auto c = ParseConfig(kTls + "[volume v]\nimage = i\npeer = h:1\n", "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->volumes.size(), 1u);
  EXPECT_EQ(c->volumes[0].block_size, 4u << 20);  // an RBD object
  EXPECT_EQ(c->volumes[0].window, 4u);            // 16 MiB of reads in flight
}

TEST(Config, SinkRetentionAndWindow) {
  auto c = ParseConfig(kSinkSecure + "[sink]\npools = rbd\n", "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->sink->keep_points, 24u);  // bounded unless asked
  EXPECT_EQ(c->sink->window, 32u);
  EXPECT_EQ(c->sink->window_bytes, 32u << 20);
  c = ParseConfig(
      kSinkSecure + "[sink]\npools = rbd\nkeep_points = 48\nwindow = 8\nwindow_bytes = 64M\n",
      "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->sink->keep_points, 48u);
  EXPECT_EQ(c->sink->window, 8u);
  EXPECT_EQ(c->sink->window_bytes, 64u << 20);
  EXPECT_THAT(Error(kSinkSecure + "[sink]\npools = rbd\nwindow_bytes = 64K\n"),
              HasSubstr("[sink] window_bytes: 65536 is out of range [1048576, 1073741824]"));
  EXPECT_THAT(Error(kSinkSecure + "[sink]\npools = rbd\nwindow = 0\n"),
              HasSubstr("[sink] window: 0 is out of range [1, 256]"));
  EXPECT_THAT(Error(kSinkSecure + "[sink]\npools = rbd\nkeep_points = -1\n"),
              HasSubstr("keep_points"));
  c = ParseConfig(kSinkSecure + "[sink]\npools = rbd\nretention = 10m*6 1h*24 1d*30\n", "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->sink->retention_tiers.size(), 3u);
  EXPECT_EQ(c->sink->retention_tiers[2].count, 30u);
  EXPECT_THAT(Error(kSinkSecure + "[sink]\npools = rbd\nretention = 1d\n"),
              HasSubstr("[sink] retention: retention tier '1d' has no '*'"));
}

}  // namespace
}  // namespace cairn

namespace cairn {
namespace {

TEST(Config, LinksAreMutualTlsUnlessExplicitlyInsecure) {
  const std::string volume = "[volume v]\nimage = i\npeer = h:1\n";
  EXPECT_THAT(Error(volume), HasSubstr("f.conf: [tls] needs ca, cert and key"));
  EXPECT_THAT(Error("[tls]\nca = /x/ca.pem\n" + volume), HasSubstr("[tls] needs ca, cert and key"));
  auto c = ParseConfig("[tls]\ninsecure = true\n" + volume, "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE(c->tls.insecure);
  EXPECT_THAT(Error("[tls]\ninsecure = yes\n" + volume),
              HasSubstr("[tls] insecure: is true or false"));
  EXPECT_THAT(Error("[tls]\ninsecure = true\nca = /x/ca.pem\n" + volume),
              HasSubstr("say which one is meant"));
  EXPECT_THAT(Error("[tls]\ninsecure = true\n[peer a]\nsite = a\n[sink]\npools = rbd\n"),
              HasSubstr("[peer a] cannot be checked over plaintext links"));
}

TEST(Config, SinkGrantsEachSourceWhatItMayWrite) {
  EXPECT_THAT(Error(kTls + "[sink]\npools = rbd\n"),
              HasSubstr("[sink] needs a [peer NAME] section for each source"));
  EXPECT_THAT(Error(kSinkSecure + "[volume v]\nimage = i\npeer = h:1\n"),
              HasSubstr("[peer site-a] grants what a source may write to this node's sink, but "
                        "there is no [sink]"));
  EXPECT_THAT(Error(kTls + "[peer x]\npools = rbd\n[sink]\npools = rbd\n"),
              HasSubstr("[peer x] needs 'site'"));
  EXPECT_THAT(Error(kTls + "[peer x]\nsite = a\npools = other\n[sink]\npools = rbd\n"),
              HasSubstr("[peer x] pools: 'other' is not one of [sink] pools"));
  EXPECT_THAT(Error(kTls + "[peer x]\nsite = a\n[peer x]\nsite = b\n[sink]\npools = rbd\n"),
              HasSubstr("set twice"));
  EXPECT_THAT(Error(kTls + "[peer x]\nsite = a\nvolumes = ,\n[sink]\npools = rbd\n"),
              HasSubstr("lists no volume"));
  EXPECT_THAT(Error(kTls + "[peer x]\nsite = a\nrole = sink\n[sink]\npools = rbd\n"),
              HasSubstr("[peer x] has unknown key 'role'"));
  EXPECT_THAT(Error(kTls + "[peer]\nsite = a\n[sink]\npools = rbd\n"),
              HasSubstr("[peer] needs a NAME"));
  auto c = ParseConfig(
      kSinkSecure + "[sink]\npools = rbd\n[source]\npeer = h:1\npeer_name = site-b\n", "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->source->peer_name, "site-b");
  EXPECT_EQ(c->peers[0].volumes, (std::vector<std::string>{"*"}));
  EXPECT_TRUE(c->peers[0].pools.empty());  // every pool of the sink
}

}  // namespace
TEST(Config, AVolumesOwnRetentionAndAGroupsMembersShareTheirs) {
  const std::string member = "[volume a]\nimage = a\npeer = h:1\ngroup = db\n";
  auto c = ParseConfig(kTls + "[volume v]\nimage = i\npeer = h:1\n", "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_FALSE(c->volumes[0].retention.has_value()) << "none of its own: the sink's";
  c = ParseConfig(kTls + "[volume v]\nimage = i\npeer = h:1\nretention = 1h*24 1d*7\n", "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_TRUE(c->volumes[0].retention.has_value());
  EXPECT_EQ(c->volumes[0].retention->keep_last, 24u);
  EXPECT_EQ(FormatRetentionTiers(c->volumes[0].retention->tiers), "1h*24 1d*7");
  c = ParseConfig(kTls + member + "keep_points = 3\n" +
                      "[volume b]\nimage = b\npeer = h:1\ngroup = db\nkeep_points = 3\n" +
                      "[source]\npeer = h:1\nkeep_points = 0\n",
                  "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->volumes[1].retention, (RetentionRules{3, {}}));
  EXPECT_EQ(c->source->retention, (RetentionRules{0, {}}));
  EXPECT_THAT(Error(kTls + member + "[volume b]\nimage = b\npeer = h:1\ngroup = db\n" +
                    "retention = 1h*2\n"),
              HasSubstr("volumes 'a' and 'b' are both in group db but keep points by other rules"));
  EXPECT_THAT(Error(kTls + "[volume v]\nimage = i\npeer = h:1\nretention = 2mo*3\n"),
              HasSubstr("[volume v] retention: retention tier '2mo*3'"));
  c = ParseConfig(kTls + "[volume v]\nimage = i\npeer = h:1\nsnapshot_retention = 1d*7\n" +
                      "[source]\npeer = h:1\nsnapshot_retention = 1h*24\n",
                  "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(FormatRetentionTiers(c->volumes[0].snapshot_tiers), "1d*7");
  EXPECT_FALSE(c->volumes[0].retention.has_value()) << "the source's snapshots only";
  EXPECT_EQ(FormatRetentionTiers(c->source->snapshot_tiers), "1h*24");
  EXPECT_THAT(Error(kTls + "[source]\npeer = h:1\nsnapshot_retention = 1h\n"),
              HasSubstr("[source] snapshot_retention: retention tier '1h' has no '*'"));
}

TEST(Config, CompressionAndTheSendCapAreOffUnlessSet) {
  auto c = ParseConfig(kTls + "[volume v]\nimage = i\npeer = h:1\n" +
                           "[volume w]\nimage = j\npeer = h:1\ncompression = zstd\n" +
                           "[source]\npeer = h:1\ncompression = lz4\n",
                       "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->volumes[0].compression, Compression::kNone);
  EXPECT_EQ(c->volumes[1].compression, Compression::kZstd);
  EXPECT_EQ(c->source->compression, Compression::kLz4);
  c = ParseConfig(kTls + "[cairnd]\nmax_send_rate = 12M\n[volume v]\nimage = i\npeer = h:1\n",
                  "f.conf");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->max_send_rate, 12u << 20);
  EXPECT_THAT(Error(kTls + "[cairnd]\nmax_send_rate = 1K\n[volume v]\nimage = i\npeer = h:1\n"),
              HasSubstr("[cairnd] max_send_rate: is bytes a second: at least 64K"));
  EXPECT_THAT(Error(kTls + "[volume v]\nimage = i\npeer = h:1\ncompression = gzip\n"),
              HasSubstr("[volume v] compression: 'gzip' is not a codec (none, lz4 or zstd)"));
}

}  // namespace cairn
