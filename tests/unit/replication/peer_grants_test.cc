// Who may write into a sink (engine/replication/peer_grants.h): the grant
// rules alone, then the Sink refusing sources by their certificate names
// before it opens the volume's pool or catalog, and keeping a live session
// from being replaced by another peer.
#include "engine/replication/peer_grants.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/catalog/kv_store.h"
#include "engine/replication/replication.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/memory_spool_store.h"
#include "engine/volume/memory_volume.h"
#include "proto/cairn.pb.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

using ::testing::HasSubstr;
using namespace std::chrono_literals;

std::vector<PeerGrant> Grants() {
  return {{.name = "site-a", .site = "a", .pools = {"rbd"}, .volumes = {"vol*"}},
          {.name = "site-c", .site = "c", .pools = {}, .volumes = {"*"}}};
}

TEST(PeerGrants, AllowOnlyWhatAGrantSays) {
  const auto grants = std::make_optional(Grants());
  const std::vector<std::string> a = {"site-a", "127.0.0.1"};
  EXPECT_TRUE(AuthorizeSource(grants, a, "a", "rbd", "vol1").ok());
  EXPECT_TRUE(AuthorizeSource(grants, {"10.0.0.1", "site-a"}, "a", "rbd", "vol7").ok());
  const Status other_site = AuthorizeSource(grants, a, "b", "rbd", "vol1");
  EXPECT_EQ(other_site.code(), Code::kPermissionDenied);
  EXPECT_THAT(other_site.message(), HasSubstr("does not allow site 'b'"));
  EXPECT_EQ(AuthorizeSource(grants, a, "a", "volumes", "vol1").code(), Code::kPermissionDenied);
  EXPECT_EQ(AuthorizeSource(grants, a, "a", "rbd", "db1").code(), Code::kPermissionDenied);
  const Status stranger = AuthorizeSource(grants, {"mallory"}, "a", "rbd", "vol1");
  EXPECT_EQ(stranger.code(), Code::kPermissionDenied);
  EXPECT_THAT(stranger.message(), HasSubstr("no [peer NAME] grant"));
  EXPECT_EQ(AuthorizeSource(grants, {}, "a", "rbd", "vol1").code(), Code::kPermissionDenied);
  EXPECT_TRUE(AuthorizeSource(grants, {"site-c"}, "c", "any-pool", "any").ok());
  // Without TLS there are no names to check: everyone may.
  EXPECT_TRUE(AuthorizeSource(std::nullopt, {}, "x", "rbd", "vol1").ok());
}

// A link whose peer is authenticated as `names` (as mutual TLS would).
class NamedLink final : public Link {
 public:
  NamedLink(std::unique_ptr<Link> inner, std::vector<std::string> names)
      : inner_(std::move(inner)), names_(std::move(names)) {}
  Status Send(FrameType type, std::string_view body, std::span<const char> payload) override {
    return inner_->Send(type, body, payload);
  }
  StatusOr<Frame> Receive(std::chrono::milliseconds timeout) override {
    return inner_->Receive(timeout);
  }
  void Close() override { inner_->Close(); }
  const std::string& peer() const override { return inner_->peer(); }
  const std::vector<std::string>& peer_names() const override { return names_; }

 private:
  std::unique_ptr<Link> inner_;
  std::vector<std::string> names_;
};

class SinkGrantsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    site_a_ = std::make_shared<MemoryPool>("rbd");
    site_b_ = std::make_shared<MemoryPool>("rbd");
    catalog_ = std::make_shared<MemoryKvStore>();
    SinkEnv env;
    env.site = "b";
    env.spools = std::make_shared<MemorySpoolStore>();
    env.pools = {"rbd", "volumes"};
    env.grants = Grants();
    env.open_pool = [this](const std::string&) -> StatusOr<std::shared_ptr<Pool>> {
      ++state_reads_;
      return std::shared_ptr<Pool>(site_b_);
    };
    env.open_catalog = [this](const std::string&) -> StatusOr<std::shared_ptr<KvStore>> {
      ++state_reads_;
      return std::shared_ptr<KvStore>(catalog_);
    };
    sink_ = std::make_unique<Sink>(env);
  }
  void TearDown() override {
    for (auto& t : sessions_) t.join();
  }

  // A link to the sink from a peer named `names`, served on a thread.
  std::unique_ptr<Link> ConnectAs(std::vector<std::string> names) {
    auto [a, b] = MakeMemoryLinkPair();
    sessions_.emplace_back([this, l = std::make_unique<NamedLink>(std::move(b), names)] {
      [[maybe_unused]] const Status ended = sink_->Serve(*l);
    });
    return std::move(a);
  }

  // What the sink answers a Hello for `volume` in `pool` from `site`.
  Status HelloAs(std::vector<std::string> names, const std::string& site, const std::string& volume,
                 const std::string& pool = "rbd") {
    auto link = ConnectAs(std::move(names));
    pb::Hello h;
    h.set_protocol_version(kProtocolVersion);
    h.set_volume(volume);
    h.set_pool(pool);
    h.set_image("img-standby");
    h.set_source_site(site);
    RETURN_IF_ERROR(link->Send(FrameType::kHello, h.SerializeAsString(), {}));
    ASSIGN_OR_RETURN(Frame f, link->Receive(10s));
    if (f.type != FrameType::kLinkError) {
      return Internal(fmt::format("the sink answered with a {} frame", FrameTypeName(f.type)));
    }
    return StatusFromLinkError(f, "sink");
  }

  std::shared_ptr<MemoryPool> site_a_, site_b_;
  std::shared_ptr<MemoryKvStore> catalog_;
  std::atomic<int> state_reads_{0};
  std::unique_ptr<Sink> sink_;
  std::vector<std::thread> sessions_;
};

TEST_F(SinkGrantsTest, SourceOutsideTheGrantsIsRefusedBeforeAnyStateIsRead) {
  for (const auto& [names, site, volume, pool] :
       std::vector<std::tuple<std::vector<std::string>, std::string, std::string, std::string>>{
           {{"mallory"}, "a", "vol1", "rbd"},    // no grant names it
           {{}, "a", "vol1", "rbd"},             // not authenticated
           {{"site-a"}, "c", "vol1", "rbd"},     // claims another site
           {{"site-a"}, "a", "db1", "rbd"},      // a volume not granted
           {{"site-a"}, "a", "vol1", "volumes"}  // a pool not granted
       }) {
    SCOPED_TRACE(fmt::format("{} as site {}: {}/{}", fmt::join(names, ","), site, pool, volume));
    const Status st = HelloAs(names, site, volume, pool);
    EXPECT_EQ(st.code(), Code::kPermissionDenied) << st.ToString();
  }
  EXPECT_EQ(state_reads_, 0) << "a refused source made the sink open a pool or catalog";
  auto keys = catalog_->Scan("");
  ASSERT_TRUE(keys.ok());
  EXPECT_TRUE(keys->empty());
}

TEST_F(SinkGrantsTest, LiveSessionIsReplacedOnlyByTheSamePeer) {
  auto img = site_a_->Create("img", 4 << 20);
  ASSERT_TRUE(img.ok());
  auto vol = testing::MustOpen(*site_a_, "img");
  testing::Write(*vol, 0, std::string(64 * 1024, 'a'));
  VolumeConfig c;
  c.id = "vol1";
  c.image = "img";
  c.target_pool = "rbd";
  c.target_image = "img-standby";
  c.interval = 0ms;
  SourceReplicator source(c, "a", site_a_, [this] { return ConnectAs({"site-a"}); });
  auto first = source.RunOnce();
  ASSERT_TRUE(first.ok()) << first.status().ToString();

  // site-c may write vol1 too, but not take over site-a's live session.
  const Status st = HelloAs({"site-c"}, "c", "vol1");
  EXPECT_EQ(st.code(), Code::kPermissionDenied) << st.ToString();
  EXPECT_THAT(st.message(), HasSubstr("replicated here by site-a"));

  testing::Write(*vol, 1 << 20, std::string(64 * 1024, 'b'));
  auto second = source.RunOnce();
  ASSERT_TRUE(second.ok()) << "the live session was disturbed: " << second.status().ToString();
  EXPECT_EQ(second->id.seq, first->id.seq + 1);
  auto points = sink_->Points("vol1");
  ASSERT_TRUE(points.ok());
  ASSERT_EQ(points->size(), 2u);
  EXPECT_EQ(
      testing::ImageHash(*testing::MustOpen(*site_b_, "img-standby"), points->back().snap, 4 << 20),
      testing::ImageHash(*vol, SnapName(second->id.seq), 4 << 20));
  source.Disconnect();
}

}  // namespace
}  // namespace cairn
