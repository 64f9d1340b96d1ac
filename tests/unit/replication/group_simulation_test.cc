// The seeded simulator for consistency groups: the real GroupSource, its
// members' SourceReplicators and the Sink over in-memory volumes, an
// in-memory catalog, real spool files and in-process links, the volumes
// and every member's link wrapped in their fault layers, driven through
// random fault schedules. Each step writes to some members, takes an
// instant and has the members ship what they lack, under one fault: a bit
// flipped, a frame lost, duplicated or cut on one member's link either
// way, a failed read at site A or write at site B, a group snapshot or a
// member's own snapshot that fails, a member that does not run (its link
// down), a torn spool file, a restart of the sink or of site A's group.
//
// After the faults stop, the group must converge to a group point of a new
// instant, and then:
//  - every group point holds every member, and every member's point equals
//    by whole-image hash its share of the group snapshot it stands for;
//  - every member's points form one chain from its first: never a resend;
//  - a byte rotted at site B in one member's newest point is found by
//    `verify` at its grain, and the repair (the next instant, under one
//    more fault) sends only that grain; the group converges again, and
//    every point checks as above.
//
// Schedules: a fifth of CAIRN_SIM_SEEDS (default 200; sim_util.h);
// CAIRN_SIM_SEED=S replays one. A failure prints its seed.
#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <random>
#include <thread>

#include "engine/catalog/catalog.h"
#include "engine/epoch/block_digests.h"
#include "engine/link/fault_link.h"
#include "engine/replication/group_source.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/file_spool_store.h"
#include "engine/volume/fault_pool.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/replication/sim_util.h"
#include "tests/unit/test_util.h"

namespace cairn {
namespace {

constexpr uint64_t kKiB = 1024;

enum class Fault {
  kNone,
  kFlipBit,
  kDropFrame,
  kDuplicateFrame,
  kCutToSink,
  kCutToSource,
  kDropAck,
  kSourceReadError,
  kStandbyWriteError,
  kGroupSnapFails,
  kMemberSnapFails,
  kMemberDown,
  kTornSpool,
  kSinkRestart,
  kSourceRestart,
  kCount
};

const char* FaultName(Fault f) {
  static const char* names[] = {"none",
                                "flip-bit",
                                "drop-frame",
                                "duplicate-frame",
                                "cut-to-sink",
                                "cut-to-source",
                                "drop-ack",
                                "source-read-error",
                                "standby-write-error",
                                "group-snapshot-fails",
                                "member-snapshot-fails",
                                "member-down",
                                "torn-spool",
                                "sink-restart",
                                "source-restart"};
  return names[static_cast<int>(f)];
}

struct Counters {
  uint64_t schedules = 0, faults = 0, instants_failed = 0, epochs_failed = 0;
  uint64_t group_points = 0, member_points = 0, repairs = 0;
  uint64_t by_kind[static_cast<int>(Fault::kCount)] = {};
};

class GroupWorld {
 public:
  GroupWorld(uint64_t seed, const std::filesystem::path& dir)
      : rng_(seed), spool_(dir / std::to_string(seed)) {
    a_ = std::make_shared<MemoryPool>("rbd", MemoryPoolOptions{4096, Clock()});
    b_ = std::make_shared<MemoryPool>("rbd", MemoryPoolOptions{4096, Clock()});
    fault_a_ = std::make_shared<FaultPool>(*a_);
    fault_b_ = std::make_shared<FaultPool>(*b_);
    kv_ = std::make_shared<MemoryKvStore>();
    quick_.hello = quick_.stall = quick_.ack = std::chrono::milliseconds(50);
    quick_.idle = std::chrono::milliseconds(200);
    NewSink(quick_);
  }
  ~GroupWorld() {
    StopGroup();
    JoinSessions();
    sink_.reset();  // before its spool files go
    std::filesystem::remove_all(spool_);
  }

  void Run(Counters& counters) {
    MakeImages();
    NewGroup(quick_);
    const int steps = 5 + static_cast<int>(rng_() % 7);
    for (int step = 0; step < steps; ++step) {
      Step(counters);
      if (::testing::Test::HasFatalFailure()) return;
    }
    // The faults stop: the group must converge to a group point of a new
    // instant.
    Restart(LinkTimeouts{});
    WriteSome();
    const uint64_t last = Converge();
    if (::testing::Test::HasFatalFailure()) return;
    CheckPoints(last, counters);
    if (::testing::Test::HasFailure()) return;
    RotAndRepair(counters);
  }

  const std::string& trace() const { return trace_; }

 private:
  std::function<int64_t()> Clock() {
    return [this] { return ++now_ns_; };
  }

  void MakeImages() {
    const int n = 2 + static_cast<int>(rng_() % 3);
    ASSERT_TRUE(a_->CreateGroup("app").ok());
    for (int i = 0; i < n; ++i) {
      const std::string image = "m" + std::to_string(i);
      const uint64_t size = (128 + rng_() % 512) * kKiB + rng_() % 4096;  // odd sizes
      ASSERT_TRUE(a_->Create(image, size).ok());
      ASSERT_TRUE(a_->AddToGroup("app", image).ok());
      images_.push_back(image);
      sizes_.push_back(size);
    }
  }

  void WriteSome() {
    for (size_t i = 0; i < images_.size(); ++i) {
      if (rng_() % 3 == 0) continue;
      auto vol = testing::MustOpen(*a_, images_[i]);
      testing::RandomChanges(*vol, rng_, sizes_[i], 1 + static_cast<int>(rng_() % 4));
    }
  }

  void Step(Counters& counters) {
    WriteSome();
    const Fault f = static_cast<Fault>(rng_() % static_cast<int>(Fault::kCount));
    const size_t victim = rng_() % images_.size();
    if (f != Fault::kNone) ++counters.faults;
    ++counters.by_kind[static_cast<int>(f)];
    trace_ += std::string(FaultName(f)) + "@" + images_[victim] + " ";
    if (f == Fault::kSinkRestart) {
      for (auto& m : members_) m->Disconnect();  // a crashed sink's sockets close
      NewSink(quick_);
    }
    if (f == Fault::kSourceRestart) Restart(quick_);
    if (f == Fault::kTornSpool) sim::TearSpools(spool_, rng_);
    Arm(f, victim);
    if (!group_->TakeInstant().ok()) ++counters.instants_failed;
    for (size_t i = 0; i < members_.size(); ++i) {
      if (f == Fault::kMemberDown && i == victim) continue;
      // A member ships the oldest instant its sink lacks: a member behind
      // ships its backlog, one epoch each.
      for (int k = 0; k < 4; ++k) {
        auto r = members_[i]->RunOnce();
        if (r.ok()) continue;
        if (r.status().code() != Code::kFailedPrecondition) ++counters.epochs_failed;
        break;
      }
    }
    Disarm();
    CheckGroupsWhole(std::string("after a step with ") + FaultName(f));
    if (rng_() % 2) {  // half the time the links stay up for the next step
      for (auto& m : members_) m->Disconnect();
      JoinSessions();
    }
  }

  // Takes an instant with no fault and has every member ship all it
  // lacks; returns the instant's seq.
  uint64_t Converge() {
    StatusOr<uint64_t> seq = Internal("no instant tried");
    if (::testing::Test::HasFatalFailure()) return 0;
    for (int attempt = 0; attempt < 3 && !seq.ok(); ++attempt) seq = group_->TakeInstant();
    EXPECT_TRUE(seq.ok()) << "no instant after the faults stopped: " << seq.status().ToString();
    if (!seq.ok()) return 0;
    ShipAll();
    for (auto& m : members_) m->Disconnect();
    JoinSessions();
    return *seq;
  }

  // Every member ships all it lacks.
  void ShipAll() {
    for (size_t i = 0; i < members_.size(); ++i) {
      for (int k = 0; k < 40; ++k) {
        auto r = RunUntilShipped(*members_[i]);
        if (!r.ok() && r.status().code() == Code::kFailedPrecondition) break;  // nothing left
        ASSERT_TRUE(r.ok()) << images_[i] << " did not converge after the faults stopped: "
                            << r.status().ToString();
      }
    }
  }

  // Runs `m` until an epoch is made or nothing is left to ship
  // (kFailedPrecondition), for up to 10 s: after a failed write the sink
  // applies a spooled epoch by itself, with backoff, and refuses sessions
  // until then.
  static StatusOr<EpochSummary> RunUntilShipped(SourceReplicator& m) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      auto r = m.RunOnce();
      if (r.ok() || r.status().code() == Code::kFailedPrecondition ||
          std::chrono::steady_clock::now() > deadline) {
        return r;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  // Every group point the catalog lists holds every member: checked after
  // every step, while some members lag behind the others.
  void CheckGroupsWhole(const std::string& when) {
    auto groups = Catalog(*kv_).GroupPoints("app");
    ASSERT_TRUE(groups.ok()) << groups.status().ToString();
    std::vector<std::string> all;
    for (const auto& image : images_) all.push_back("vol-" + image);
    for (const auto& g : *groups) {
      EXPECT_EQ(g.volumes, all) << "group point " << g.seq << " lacks a member " << when;
    }
  }

  // `rotten`: a member's point whose snapshot at site B rotted; it must
  // differ, and be recorded as differing by its verify; the points after
  // it (the repair's and on) equal their sources again.
  void CheckPoints(uint64_t last, Counters& counters, const RestorePoint* rotten = nullptr) {
    Catalog catalog(*kv_);
    auto groups = catalog.GroupPoints("app");
    ASSERT_TRUE(groups.ok()) << groups.status().ToString();
    ASSERT_FALSE(groups->empty()) << "no group point";
    EXPECT_EQ(groups->back().seq, last) << "the instant taken after the faults is no group point";
    CheckGroupsWhole("after the faults");
    counters.group_points += groups->size();
    for (size_t i = 0; i < images_.size(); ++i) {
      auto points = catalog.Points("vol-" + images_[i]);
      ASSERT_TRUE(points.ok()) << points.status().ToString();
      auto src = testing::MustOpen(*a_, images_[i]);
      auto standby = testing::MustOpen(*b_, images_[i] + "-standby");
      uint64_t prev = 0;
      for (const auto& p : *points) {
        EXPECT_EQ(p.epoch.base_seq, prev) << images_[i] << ": point " << p.epoch.seq;
        prev = p.epoch.seq;
        const bool rotted =
            rotten && rotten->epoch.volume == p.epoch.volume && rotten->epoch.seq == p.epoch.seq;
        // The rotten chunk may be shared by the member's older points (as a
        // RADOS object is by the snapshots before its first change).
        if (rotten && rotten->epoch.volume == p.epoch.volume && p.epoch.seq < rotten->epoch.seq) {
          continue;
        }
        const bool equal =
            testing::ImageHash(*standby, p.snap, p.epoch.image_size) ==
            testing::ImageHash(*src, GroupSnapName(SnapName(p.epoch.seq)), p.epoch.image_size);
        EXPECT_EQ(equal, !rotted) << images_[i] << ": point " << p.epoch.seq
                                  << (rotted ? " is equal to its source although it rotted"
                                             : " differs from its share of the group snapshot");
        if (rotted) {
          EXPECT_TRUE(p.verification && p.verification->mismatched_grains == 1)
              << "the rotten point " << p.epoch.seq << " is not recorded as differing";
        }
        ++counters.member_points;
      }
    }
  }

  // A byte rots at site B in one member's newest point; verify finds its
  // grain, and the next instant repairs it with that grain alone, under
  // one more fault first.
  void RotAndRepair(Counters& counters) {
    const size_t i = rng_() % images_.size();
    const std::string standby = images_[i] + "-standby";
    Catalog catalog(*kv_);
    auto points = catalog.Points("vol-" + images_[i]);
    ASSERT_TRUE(points.ok() && !points->empty());
    const RestorePoint newest = points->back();
    // A byte of data (a sparse stretch has none to rot).
    const uint64_t chunks = (newest.epoch.image_size + 4095) / 4096, first = rng_() % chunks;
    uint64_t rotten = newest.epoch.image_size;
    for (uint64_t k = 0; k < chunks && rotten == newest.epoch.image_size; ++k) {
      const uint64_t at = (first + k) % chunks * 4096 + rng_() % 4096;
      if (at < newest.epoch.image_size && b_->RotByte(standby, newest.snap, at).ok()) rotten = at;
    }
    if (rotten == newest.epoch.image_size) return;  // nothing but zeros
    SourceReplicator& member = *members_[i];
    ASSERT_TRUE(member.StartVerify(newest.epoch.seq, /*repair=*/true).ok());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (member.Report().verify.running) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << "the verify of " << images_[i] << " did not end within 30 s";
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    const VerifyStatusInfo v = member.Report().verify;
    ASSERT_TRUE(v.error.empty()) << v.error;
    ASSERT_EQ(v.mismatches.size(), 1u) << "the byte rotten at " << rotten << " was not found";
    EXPECT_EQ(v.mismatches[0].offset, rotten / kDigestGrain * kDigestGrain);

    // The repair outlives a failed epoch: it is asked for until a point
    // carries it.
    const Fault f = static_cast<Fault>(1 + rng_() % static_cast<int>(Fault::kStandbyWriteError));
    trace_ += std::string("repair-under-") + FaultName(f) + " ";
    auto seq = group_->TakeInstant();
    ASSERT_TRUE(seq.ok()) << seq.status().ToString();
    Arm(f, i);
    StatusOr<EpochSummary> sum = member.RunOnce();
    Disarm();
    // An ack lost after the sink made the point: nothing is left to ship.
    if (!sum.ok() && sum.status().code() != Code::kFailedPrecondition) {
      sum = RunUntilShipped(member);
    }
    if (sum.ok()) {
      EXPECT_EQ(sum->id.seq, *seq);
      // The grain as data, or as zeros where the source's grain is zeros.
      const uint64_t sent = sum->data_bytes + sum->zero_bytes;
      EXPECT_GT(sent, 0u) << "the repair sent nothing";
      EXPECT_LE(sent, kDigestGrain) << "the repair sent more than the rotten grain";
      EXPECT_EQ(member.Report().verify.repaired_seq, *seq);
    } else {
      ASSERT_EQ(sum.status().code(), Code::kFailedPrecondition) << sum.status().ToString();
    }
    const uint64_t last = Converge();
    if (::testing::Test::HasFatalFailure()) return;
    CheckPoints(last, counters, &newest);
    auto repaired = catalog.Points("vol-" + images_[i]);
    ASSERT_TRUE(repaired.ok() && !repaired->empty());
    EXPECT_GE(repaired->back().epoch.seq, *seq) << "no point after the repair's instant";
    ++counters.repairs;
  }

  void NewSink(LinkTimeouts t) {
    JoinSessions();
    SinkEnv env = sim::SinkEnvFor("b", spool_, fault_b_, kv_, t);
    env.retry_min = std::chrono::milliseconds(5);  // the sink's own apply retries
    env.retry_max = std::chrono::milliseconds(50);
    sink_.reset();  // a crashed sink is gone before the next one starts
    sink_ = std::make_unique<Sink>(env);
  }

  // Site A's cairnd restarted: a new group and new members, which learn
  // where they are from the snapshots and the sink.
  void Restart(const LinkTimeouts& t) {
    StopGroup();
    JoinSessions();
    NewGroup(t);
  }

  void NewGroup(const LinkTimeouts& t) {
    to_sink_.assign(images_.size(), nullptr);
    to_source_.assign(images_.size(), nullptr);
    for (size_t i = 0; i < images_.size(); ++i) {
      VolumeConfig c;
      c.id = "vol-" + images_[i];
      c.image = images_[i];
      c.target_pool = "rbd";
      c.target_image = images_[i] + "-standby";
      c.keep_snapshots = 1000;  // kept to compare every point against
      c.block_size = 16 * kKiB;
      c.window = 3;
      c.group = "app";
      members_.push_back(std::make_shared<SourceReplicator>(c, "a", fault_a_, Connector(i), t));
    }
    group_ = std::make_unique<GroupSource>("app", fault_a_, std::chrono::milliseconds(0), members_);
  }

  void StopGroup() {
    for (auto& m : members_) m->Disconnect();
    group_.reset();
    members_.clear();
  }

  // Member i's links: its armed wire faults, the sink's end served on a
  // thread (a verify connects from its own thread).
  SourceReplicator::Connector Connector(size_t i) {
    return [this, i]() -> StatusOr<std::unique_ptr<Link>> {
      std::lock_guard lock(mu_);
      auto [a, b] = MakeMemoryLinkPair(256 * kKiB);
      auto src = std::make_unique<FaultLink>(std::move(a), std::move(to_sink_[i]));
      auto dst = std::make_unique<FaultLink>(std::move(b), std::move(to_source_[i]));
      to_sink_[i] = to_source_[i] = nullptr;
      Sink* sink = sink_.get();
      sessions_.emplace_back([sink, l = std::move(dst)]() mutable { (void)sink->Serve(*l); });
      return std::unique_ptr<Link>(std::move(src));
    };
  }

  void Arm(Fault f, size_t victim) {
    const int n = static_cast<int>(rng_() % 12);
    const uint64_t r = rng_();
    std::lock_guard lock(mu_);
    switch (f) {
      case Fault::kFlipBit:
        to_sink_[victim] = sim::AtFrame(n, [r](std::string& b) {
          b[r % b.size()] ^= static_cast<char>(1 << (r >> 32) % 8);
          return WireFault::kDeliver;
        });
        break;
      case Fault::kDropFrame:
        to_sink_[victim] = sim::AtFrame(n, [](std::string&) { return WireFault::kDrop; });
        break;
      case Fault::kDuplicateFrame:
        to_sink_[victim] = sim::AtFrame(n, [](std::string&) { return WireFault::kDuplicate; });
        break;
      case Fault::kCutToSink:
        to_sink_[victim] = sim::AtFrame(n, [](std::string&) { return WireFault::kCut; });
        break;
      case Fault::kCutToSource:
        to_source_[victim] =
            sim::AtFrame(static_cast<int>(r % 3), [](std::string&) { return WireFault::kCut; });
        break;
      case Fault::kDropAck:
        to_source_[victim] =
            sim::AtFrame(static_cast<int>(r % 3), [](std::string&) { return WireFault::kDrop; });
        break;
      case Fault::kSourceReadError:
        sim::FailOnce(*fault_a_, VolumeOp::kRead, n);
        break;
      case Fault::kStandbyWriteError:
        sim::FailOnce(*fault_b_, VolumeOp::kWrite, n);
        break;
      case Fault::kGroupSnapFails:
        sim::FailOnce(*fault_a_, VolumeOp::kCreateGroupSnap, 0);
        break;
      case Fault::kMemberSnapFails:
        sim::FailOnce(*fault_a_, VolumeOp::kCreateSnap, static_cast<int>(victim));
        break;
      default:
        break;
    }
  }

  void Disarm() {
    std::lock_guard lock(mu_);
    std::fill(to_sink_.begin(), to_sink_.end(), nullptr);
    std::fill(to_source_.begin(), to_source_.end(), nullptr);
    fault_a_->SetFault(nullptr);
    fault_b_->SetFault(nullptr);
  }

  void JoinSessions() {
    std::vector<std::thread> done;
    {
      std::lock_guard lock(mu_);
      done.swap(sessions_);
    }
    for (auto& t : done) t.join();
  }

  std::mt19937_64 rng_;
  std::filesystem::path spool_;
  std::atomic<int64_t> now_ns_{1'700'000'000'000'000'000};
  std::shared_ptr<MemoryPool> a_, b_;
  // What the group, its members and the sink use: the pools above, with faults.
  std::shared_ptr<FaultPool> fault_a_, fault_b_;
  std::shared_ptr<MemoryKvStore> kv_;
  std::unique_ptr<Sink> sink_;
  LinkTimeouts quick_;
  std::vector<std::string> images_;
  std::vector<uint64_t> sizes_;
  std::vector<std::shared_ptr<SourceReplicator>> members_;
  std::unique_ptr<GroupSource> group_;
  std::mutex mu_;  // the armed wire faults and the sessions
  std::vector<WireFaultFn> to_sink_, to_source_;
  std::vector<std::thread> sessions_;
  std::string trace_;
};

TEST(GroupSimulation, SeededFaultSchedulesLeaveOnlyWholeGroupPointsAndRepairByTheGrain) {
  spdlog::default_logger();  // made before the members' threads log (TSan)
  const auto dir =
      std::filesystem::temp_directory_path() / ("cairn-gsim-" + std::to_string(getpid()));
  Counters c;
  sim::RunSeeds(sim::Seeds(5), "GroupSimulation.*", [&](uint64_t seed) {
    GroupWorld w(seed, dir);
    w.Run(c);
    ++c.schedules;
    return w.trace();
  });
  std::filesystem::remove_all(dir);
  std::printf(
      "[          ] group simulation: %lu schedules, %lu faults, %lu instants and %lu epochs "
      "failed, %lu group points and %lu member points verified by content, %lu repairs\n",
      static_cast<unsigned long>(c.schedules), static_cast<unsigned long>(c.faults),
      static_cast<unsigned long>(c.instants_failed), static_cast<unsigned long>(c.epochs_failed),
      static_cast<unsigned long>(c.group_points), static_cast<unsigned long>(c.member_points),
      static_cast<unsigned long>(c.repairs));
  std::printf("[          ] faults by kind: %s\n",
              sim::KindCounts(c.by_kind, static_cast<int>(Fault::kCount), FaultName).c_str());
}

}  // namespace
}  // namespace cairn
