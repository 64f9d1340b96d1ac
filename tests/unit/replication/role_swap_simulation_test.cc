// The seeded simulator of failover and failback: two sites, each with the
// real Sink over its in-memory pool and catalog and real spool files, the
// real SourceReplicator both ways over the in-process link with wire
// faults. Each schedule: site A replicates to B; a partition, in which A
// may write more that never reaches B; B fails over (to its newest point,
// or an older one) and may write; the partition heals and B's image
// replicates back into A's (a split brain resolved for one side or the
// other, at random); a planned failback hands the volume home; A
// replicates to B again. Lost frames, bit flips, cuts and a sink restart
// strike the links at random throughout.
//
// Nothing is lost: after the failback A's image holds every write B
// made, the writes A made in the partition are kept as a snapshot with
// their exact content (or win, if the operator chose A), every restore
// point at either site equals by whole-image hash the snapshot it came
// from, and after the failback A's next point at B is a delta.
//
// CAIRN_SIM_SEEDS=N runs N schedules (default 200; a tenth of them here);
// CAIRN_SIM_SEED=S replays one.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include "engine/link/fault_link.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/file_spool_store.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/replication/sim_util.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

constexpr uint64_t kKiB = 1024;

class TwoSites {
 public:
  TwoSites(uint64_t seed, const std::filesystem::path& dir) : rng_(seed), dir_(dir) {
    timeouts_.hello = timeouts_.stall = timeouts_.ack = std::chrono::milliseconds(50);
    timeouts_.idle = std::chrono::milliseconds(200);
    for (Site* s : {&a_, &b_}) {
      s->name = s == &a_ ? "a" : "b";
      s->pool = std::make_shared<MemoryPool>("rbd", MemoryPoolOptions{4096, Clock()});
      s->kv = std::make_shared<MemoryKvStore>();
      NewSink(*s);
    }
  }
  ~TwoSites() {
    JoinSessions();
    a_.sink.reset();  // before their spool files go
    b_.sink.reset();
    std::filesystem::remove_all(dir_);
  }

  void Run() {
    const uint64_t size = (256 + rng_() % 512) * kKiB;
    ASSERT_TRUE(a_.pool->Create("img", size).ok());
    auto img = testing::MustOpen(*a_.pool, "img");
    auto forward = Source("img", "img-b", a_, b_);
    forward->set_stand_down(
        [this]() -> StatusOr<std::string> { return Catalog(*a_.kv).ImageOwner("rbd", "img"); });
    for (int i = 0, n = 2 + static_cast<int>(rng_() % 4); i < n; ++i) {
      testing::RandomChanges(*img, rng_, size, 1 + static_cast<int>(rng_() % 4));
      Step(*forward, b_);
    }
    Converge(*forward);
    forward->Disconnect();
    JoinSessions();

    // The partition: A may write on, and snapshot, what B never gets.
    if (rng_() % 2) {
      testing::RandomChanges(*img, rng_, size, 2);
      const auto newest = Catalog(*b_.kv).Latest("sim").value()->epoch.seq;
      ASSERT_TRUE(img->CreateSnap(SnapName(newest + 1)).ok());
      testing::RandomChanges(*img, rng_, size, 1);
    }
    trace_ += "partition ";

    // Failover at B, to the newest point or an older one.
    const auto points = Catalog(*b_.kv).Points("sim").value();
    const RestorePoint& from = rng_() % 4 == 0 ? points.front() : points.back();
    auto promoted = b_.sink->Promote("sim", from.epoch.seq, "", "img-p");
    ASSERT_TRUE(promoted.ok()) << promoted.status().ToString();
    trace_ += "failover@" + std::to_string(from.epoch.seq) + " ";
    auto p = testing::MustOpen(*b_.pool, "img-p");
    if (rng_() % 4) testing::RandomChanges(*p, rng_, size, 1 + static_cast<int>(rng_() % 3));

    const SnapInfo a_point = SnapOf(*img, SnapName(from.epoch.seq));
    const uint64_t a_wrote = BytesSince(*img, a_point).value();
    const uint64_t b_wrote = BytesSince(*p, SnapOf(*p, SnapName(from.epoch.seq))).value();
    const std::string a_before = testing::ImageHash(*img, "", size);

    // The partition heals: B's image goes back into A's.
    auto reverse = Source("img-p", "img", b_, a_);
    reverse->set_base_point(
        [this, seq = from.epoch.seq]() -> StatusOr<std::optional<SourceReplicator::BasePoint>> {
          ASSIGN_OR_RETURN(auto pt, Catalog(*b_.kv).Get("sim", seq));
          ASSIGN_OR_RETURN(auto keep, Catalog(*b_.kv).Resolution("sim"));
          return std::optional<SourceReplicator::BasePoint>({pt, keep == "b"});
        });
    auto first = reverse->RunOnce();
    reverse->Disconnect();
    JoinSessions();
    if (a_wrote > 0 && b_wrote > 0) {
      ASSERT_FALSE(first.ok());
      ASSERT_NE(first.status().message().find("split brain: since restore point"),
                std::string::npos)
          << first.status().ToString();
      EXPECT_EQ(testing::ImageHash(*img, "", size), a_before) << "a split brain changed A";
      if (rng_() % 2) {  // the operator keeps A's writes: B's are kept aside at B
        trace_ += "keep-a ";
        const std::string b_head = testing::ImageHash(*p, "", size);
        p.reset();
        auto kept = b_.sink->Release("sim");
        ASSERT_TRUE(kept.ok()) << kept.status().ToString();
        EXPECT_EQ(testing::ImageHash(*testing::MustOpen(*b_.pool, *kept), "", size), b_head);
        testing::RandomChanges(*img, rng_, size, 2);
        Converge(*forward);
        VerifyPoints(b_, *img);
        return;
      }
      trace_ += "keep-b ";
      ASSERT_TRUE(b_.sink->KeepPromoted("sim", "b").ok());
    }
    for (int i = 0, n = 1 + static_cast<int>(rng_() % 3); i < n; ++i) {
      testing::RandomChanges(*p, rng_, size, 1 + static_cast<int>(rng_() % 3));
      Step(*reverse, a_);
    }
    const uint64_t final_seq = Converge(*reverse);
    reverse->Disconnect();
    JoinSessions();
    EXPECT_EQ(testing::ImageHash(*img, "", size), testing::ImageHash(*p, "", size))
        << "B's writes did not all reach A";
    if (a_wrote > 0) {  // A's partition writes are kept, exactly
      bool kept = false;
      const std::vector<SnapInfo> snaps = img->ListSnaps().value();
      for (const auto& s : snaps) {
        if (s.name.starts_with("cairn-divergent-") && s.name.find(".cairn.") == std::string::npos) {
          EXPECT_EQ(testing::ImageHash(*img, s.name, size), a_before);
          kept = true;
        }
      }
      EXPECT_TRUE(kept) << "A's writes of the partition are gone";
    }
    VerifyPoints(a_, *p);

    // Planned failback; the hand-back may be cut on the way and is said again.
    if (rng_() % 2) to_sink_ = [](std::string&) { return WireFault::kCut; };
    auto chain = reverse->HandBack(final_seq);
    to_sink_ = nullptr;
    JoinSessions();
    if (!chain.ok()) {
      trace_ += "handback-cut ";
      chain = reverse->HandBack(final_seq);
      JoinSessions();
    }
    ASSERT_TRUE(chain.ok()) << chain.status().ToString();
    auto folded = b_.sink->FoldBack("sim", final_seq, *chain);
    bool delta = true;
    if (!folded.ok()) {  // promoted from an older point: released instead
      ASSERT_NE(from.epoch.seq, points.back().epoch.seq) << folded.status().ToString();
      ASSERT_TRUE(b_.sink->Release("sim").ok());
      delta = false;
      trace_ += "released ";
    } else {
      trace_ += "failback ";
    }
    p.reset();

    // A is the primary again, and replicates to B as a delta.
    testing::RandomChanges(*img, rng_, size, 2);
    ASSERT_TRUE(forward->RequestNow().ok()) << "A's source still stands by";
    const uint64_t next = Converge(*forward);
    const auto at_b = Catalog(*b_.kv).Get("sim", next).value();
    if (delta) {
      EXPECT_EQ(at_b.epoch.base_seq, final_seq) << "not a delta from the failback point";
    }
    VerifyPoints(b_, *img);
  }

  const std::string& trace() const { return trace_; }

 private:
  struct Site {
    std::string name;
    std::shared_ptr<MemoryPool> pool;
    std::shared_ptr<MemoryKvStore> kv;
    std::unique_ptr<Sink> sink;
  };

  std::function<int64_t()> Clock() {
    return [this] { return ++now_ns_; };
  }

  void NewSink(Site& s) {
    JoinSessions();
    s.sink.reset();  // a crashed sink is gone before the next one starts
    s.sink =
        std::make_unique<Sink>(sim::SinkEnvFor(s.name, dir_ / s.name, s.pool, s.kv, timeouts_));
  }

  std::unique_ptr<SourceReplicator> Source(const std::string& image, const std::string& target,
                                           Site& from, Site& to) {
    VolumeConfig c;
    c.id = "sim";
    c.image = image;
    c.target_pool = "rbd";
    c.target_image = target;
    c.keep_snapshots = 1000;
    c.block_size = 16 * kKiB;
    c.window = 3;
    return std::make_unique<SourceReplicator>(
        c, from.name, from.pool,
        [this, &to]() -> StatusOr<std::unique_ptr<Link>> {
          auto [l, r] = MakeMemoryLinkPair(256 * kKiB);
          auto src = std::make_unique<FaultLink>(std::move(l), to_sink_);
          auto dst = std::make_unique<FaultLink>(std::move(r), to_source_);
          Sink* sink = to.sink.get();
          sessions_.emplace_back([sink, d = std::move(dst)]() mutable { (void)sink->Serve(*d); });
          return std::unique_ptr<Link>(std::move(src));
        },
        timeouts_);
  }

  // One epoch under a random fault of the link (or a restart of the sink).
  void Step(SourceReplicator& source, Site& to) {
    const int n = static_cast<int>(rng_() % 12);
    auto at = [n, count = std::make_shared<int>(0)](WireFault f) {
      return [n, count, f](std::string&) { return (*count)++ == n ? f : WireFault::kDeliver; };
    };
    const uint64_t r = rng_();
    switch (rng_() % 7) {
      case 0:
        to_sink_ = [n, r, count = std::make_shared<int>(0)](std::string& b) {
          if ((*count)++ == n) b[r % b.size()] ^= 1;
          return WireFault::kDeliver;
        };
        trace_ += "flip ";
        break;
      case 1:
        to_sink_ = at(WireFault::kDrop);
        trace_ += "drop ";
        break;
      case 2:
        to_sink_ = at(WireFault::kCut);
        trace_ += "cut ";
        break;
      case 3:
        to_source_ = at(WireFault::kCut);
        trace_ += "cut-ack ";
        break;
      case 4:
        source.Disconnect();
        NewSink(to);
        trace_ += "sink-restart ";
        break;
      default:
        trace_ += "none ";
        break;
    }
    (void)source.RunOnce();
    to_sink_ = to_source_ = nullptr;
    if (rng_() % 2) {
      source.Disconnect();
      JoinSessions();
    }
  }

  // Faults over: within a few tries the source makes a point that holds
  // every write made so far (snapshots taken before are shipped first).
  // Its seq.
  uint64_t Converge(SourceReplicator& source) {
    source.Disconnect();
    JoinSessions();
    auto want = source.RequestNow();
    EXPECT_TRUE(want.ok()) << want.status().ToString();
    Status last;
    for (int attempt = 0; attempt < 8 && want.ok(); ++attempt) {
      auto r = source.RunOnce();
      if (r.ok() && r->id.seq >= *want) {
        source.Disconnect();
        JoinSessions();
        return r->id.seq;
      }
      last = r.status();
    }
    ADD_FAILURE() << "did not converge after the faults stopped: " << last.ToString();
    return 0;
  }

  static SnapInfo SnapOf(Volume& v, const std::string& name) {
    const std::vector<SnapInfo> snaps = v.ListSnaps().value();
    for (const auto& s : snaps) {
      if (s.name == name) return s;
    }
    ADD_FAILURE() << v.name() << " has no snapshot " << name;
    return {};
  }

  // Every point at `site` equals the snapshot of `src` it came from (kept
  // under a cairn-divergent-* name if the failback set it aside).
  void VerifyPoints(Site& site, Volume& src) {
    const auto points = Catalog(*site.kv).Points("sim").value();
    ASSERT_FALSE(points.empty());
    for (const auto& pt : points) {
      std::string snap;
      const std::vector<SnapInfo> snaps = src.ListSnaps().value();
      for (const auto& s : snaps) {  // the one taken then, else the one of that name
        if ((s.name == pt.snap || s.name.ends_with("." + pt.snap)) &&
            s.time_ns == pt.epoch.snap_time_ns) {
          snap = s.name;
        }
      }
      for (const auto& s : snaps) {
        if (snap.empty() && s.name == pt.snap) snap = s.name;
      }
      // Older points may be of the other image (the adopted one) or
      // pruned; the newest always has its source snapshot to compare with.
      if (snap.empty() && &pt == &points.back()) {
        ADD_FAILURE() << "the newest point " << pt.epoch.seq << " at site " << site.name
                      << " has no source snapshot to be checked against";
      }
      if (snap.empty()) continue;
      auto vol = testing::MustOpen(*site.pool, pt.image);
      EXPECT_EQ(testing::ImageHash(*vol, pt.snap, pt.epoch.image_size),
                testing::ImageHash(src, snap, pt.epoch.image_size))
          << "restore point " << pt.epoch.seq << " at site " << site.name << " differs from "
          << snap;
    }
  }

  void JoinSessions() {
    for (auto& t : sessions_) t.join();
    sessions_.clear();
  }

  std::mt19937_64 rng_;
  std::filesystem::path dir_;
  std::atomic<int64_t> now_ns_{1'700'000'000'000'000'000};
  LinkTimeouts timeouts_;
  Site a_, b_;
  std::vector<std::thread> sessions_;
  WireFaultFn to_sink_, to_source_;
  std::string trace_;
};

TEST(Simulation, FailoverAndFailbackBothWaysLoseNothing) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("cairn-swap-" + std::to_string(getpid()));
  const std::vector<uint64_t> seeds = sim::Seeds(10);
  sim::RunSeeds(seeds, "Simulation.FailoverAndFailback*", [&](uint64_t seed) {
    TwoSites w(seed, dir / std::to_string(seed));
    w.Run();
    return w.trace();
  });
  std::printf("[          ] role swaps: %zu schedules of failover, split brain and failback\n",
              seeds.size());
}

}  // namespace
}  // namespace cairn
