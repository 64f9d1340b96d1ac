// The seeded simulator: the real SourceReplicator and Sink code over
// in-memory volumes, an in-memory catalog, real spool files and the
// in-process link, the volumes and the link wrapped in their fault layers
// (FaultPool, FaultLink), driven through random fault schedules: bit flips,
// lost, duplicated and cut frames in both directions, failed reads at the
// source and failed writes at the standby, torn spool files, crashes
// (restarts) of either side, and a snapshot removed under the source's
// reads (read as zeros, as RADOS does). After each schedule the faults
// stop, the system must converge, and every restore point in the catalog
// must equal, by whole-image hash, the source snapshot it stands for.
//
// CAIRN_SIM_SEEDS=N runs N schedules (default 200); CAIRN_SIM_SEED=S
// replays one. A failure prints its seed.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include "engine/link/fault_link.h"
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
  kTornSpool,
  kSinkRestart,
  kSourceRestart,
  kSnapshotGoneMidRead,
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
                                "torn-spool",
                                "sink-restart",
                                "source-restart",
                                "snapshot-gone-mid-read"};
  return names[static_cast<int>(f)];
}

struct Counters {
  uint64_t schedules = 0, faults = 0, epochs_failed = 0, points_verified = 0, bytes_compared = 0;
  uint64_t by_kind[static_cast<int>(Fault::kCount)] = {};
};

class World {
 public:
  World(uint64_t seed, const std::filesystem::path& dir)
      : rng_(seed), spool_(dir / std::to_string(seed)) {
    a_ = std::make_shared<MemoryPool>("rbd", MemoryPoolOptions{4096, Clock()});
    b_ = std::make_shared<MemoryPool>("rbd", MemoryPoolOptions{4096, Clock()});
    fault_a_ = std::make_shared<FaultPool>(*a_);
    fault_b_ = std::make_shared<FaultPool>(*b_);
    kv_ = std::make_shared<MemoryKvStore>();
    timeouts_.hello = timeouts_.stall = timeouts_.ack = std::chrono::milliseconds(50);
    timeouts_.idle = std::chrono::milliseconds(200);
    NewSink(timeouts_);
  }
  ~World() {
    JoinSessions();
    sink_.reset();  // before its spool files go
    std::filesystem::remove_all(spool_);
  }

  std::function<int64_t()> Clock() {
    return [this] { return ++now_ns_; };
  }

  void NewSink(LinkTimeouts t) {
    JoinSessions();
    sink_.reset();  // a crashed sink is gone before the next one starts
    sink_ = std::make_unique<Sink>(sim::SinkEnvFor("b", spool_, fault_b_, kv_, t));
  }

  std::unique_ptr<SourceReplicator> NewSource(LinkTimeouts t) {
    VolumeConfig c;
    c.id = "sim";
    c.image = "img";
    c.target_pool = "rbd";
    c.target_image = "img-b";
    c.keep_snapshots = 1000;
    c.block_size = 16 * kKiB;
    c.window = 3;
    return std::make_unique<SourceReplicator>(
        c, "a", fault_a_,
        [this]() -> StatusOr<std::unique_ptr<Link>> {
          auto [a, b] = MakeMemoryLinkPair(256 * kKiB);
          auto src = std::make_unique<FaultLink>(std::move(a), std::move(to_sink_));
          auto dst = std::make_unique<FaultLink>(std::move(b), std::move(to_source_));
          to_sink_ = nullptr;
          to_source_ = nullptr;
          Sink* sink = sink_.get();
          sessions_.emplace_back([sink, l = std::move(dst)]() mutable { (void)sink->Serve(*l); });
          return std::unique_ptr<Link>(std::move(src));
        },
        t);
  }

  void Arm(Fault f) {
    const int n = static_cast<int>(rng_() % 12);
    const uint64_t r = rng_();
    switch (f) {
      case Fault::kFlipBit:
        to_sink_ = sim::AtFrame(n, [r](std::string& b) {
          b[r % b.size()] ^= static_cast<char>(1 << (r >> 32) % 8);
          return WireFault::kDeliver;
        });
        break;
      case Fault::kDropFrame:
        to_sink_ = sim::AtFrame(n, [](std::string&) { return WireFault::kDrop; });
        break;
      case Fault::kDuplicateFrame:
        to_sink_ = sim::AtFrame(n, [](std::string&) { return WireFault::kDuplicate; });
        break;
      case Fault::kCutToSink:
        to_sink_ = sim::AtFrame(n, [](std::string&) { return WireFault::kCut; });
        break;
      case Fault::kCutToSource:
        to_source_ =
            sim::AtFrame(static_cast<int>(r % 3), [](std::string&) { return WireFault::kCut; });
        break;
      case Fault::kDropAck:
        to_source_ =
            sim::AtFrame(static_cast<int>(r % 3), [](std::string&) { return WireFault::kDrop; });
        break;
      case Fault::kSourceReadError:
        sim::FailOnce(*fault_a_, VolumeOp::kRead, n);
        break;
      case Fault::kStandbyWriteError:
        sim::FailOnce(*fault_b_, VolumeOp::kWrite, n);
        break;
      case Fault::kSnapshotGoneMidRead:
        RemoveSnapAtRead(n);
        break;
      default:
        break;
    }
  }

  // The snapshot the source reads is removed under it at its n-th read
  // (by hand, say): the rest of its reads find zeros, as on RADOS. The
  // epoch must never become a point.
  void RemoveSnapAtRead(int n) {
    auto count = std::make_shared<std::atomic<int>>(0);
    fault_a_->SetFault([this, count, n](const VolumeFaultPoint& p) {
      if (p.op == VolumeOp::kRead && !p.snap.empty() && (*count)++ == n) {
        auto vol = a_->Open(p.image);
        if (vol.ok()) (void)(*vol)->RemoveSnap(p.snap);
      }
      return OkStatus();
    });
  }

  void Disarm() {
    to_sink_ = to_source_ = nullptr;
    fault_a_->SetFault(nullptr);
    fault_b_->SetFault(nullptr);
  }

  void JoinSessions() {
    for (auto& t : sessions_) t.join();
    sessions_.clear();
  }

  void Run(Counters& counters) {
    const uint64_t size = (256 + rng_() % 768) * kKiB + rng_() % 4096;  // odd sizes
    ASSERT_TRUE(a_->Create("img", size).ok());
    auto vol = testing::MustOpen(*a_, "img");
    auto source = NewSource(timeouts_);
    const int steps = 6 + static_cast<int>(rng_() % 8);
    for (int step = 0; step < steps; ++step) {
      testing::RandomChanges(*vol, rng_, size, 1 + static_cast<int>(rng_() % 6));
      const Fault f = static_cast<Fault>(rng_() % static_cast<int>(Fault::kCount));
      if (f != Fault::kNone) ++counters.faults;
      ++counters.by_kind[static_cast<int>(f)];
      if (f == Fault::kSinkRestart) {
        source->Disconnect();  // a crashed sink's sockets close
        NewSink(timeouts_);
      }
      if (f == Fault::kSourceRestart) source = NewSource(timeouts_);
      if (f == Fault::kTornSpool) sim::TearSpools(spool_, rng_);
      Arm(f);
      trace_ += std::string(FaultName(f)) + " ";
      if (!source->RunOnce().ok()) ++counters.epochs_failed;
      Disarm();
      if (rng_() % 2) {  // half the time the link stays up for the next step
        source->Disconnect();
        JoinSessions();
      }
    }
    // The faults stop: the system must converge to a new restore point.
    LinkTimeouts patient;
    source->Disconnect();
    NewSink(patient);
    source = NewSource(patient);
    testing::RandomChanges(*vol, rng_, size, 3);
    Status last;
    for (int attempt = 0; attempt < 3; ++attempt) {
      auto r = source->RunOnce();
      last = r.status();
      if (r.ok()) break;
    }
    source->Disconnect();
    JoinSessions();
    ASSERT_TRUE(last.ok()) << "did not converge after the faults stopped: " << last.ToString();
    Verify(*vol, counters);
  }

  void Verify(Volume& src, Counters& counters) {
    Catalog catalog(*kv_);
    auto points = catalog.Points("sim");
    ASSERT_TRUE(points.ok()) << points.status().ToString();
    ASSERT_FALSE(points->empty());
    auto standby = testing::MustOpen(*b_, "img-b");
    uint64_t prev = 0;
    for (const auto& p : *points) {
      // A chain with no gaps: never a full resend after the first point.
      EXPECT_EQ(p.epoch.base_seq, prev) << "restore point " << p.epoch.seq;
      prev = p.epoch.seq;
      EXPECT_EQ(testing::ImageHash(*standby, p.snap, p.epoch.image_size),
                testing::ImageHash(src, SnapName(p.epoch.seq), p.epoch.image_size))
          << "restore point " << p.epoch.seq << " differs from its source snapshot";
      ++counters.points_verified;
      counters.bytes_compared += 2 * p.epoch.image_size;
    }
    auto snaps = src.ListSnaps();
    ASSERT_TRUE(snaps.ok());
    EXPECT_EQ(SnapName(points->back().epoch.seq), snaps->back().name)
        << "the newest source snapshot is not a restore point";
  }

  const std::string& trace() const { return trace_; }

 private:
  std::mt19937_64 rng_;
  std::filesystem::path spool_;
  std::atomic<int64_t> now_ns_{1'700'000'000'000'000'000};
  std::shared_ptr<MemoryPool> a_, b_;
  // What the source and the sink use: the pools above, with faults.
  std::shared_ptr<FaultPool> fault_a_, fault_b_;
  std::shared_ptr<MemoryKvStore> kv_;
  std::unique_ptr<Sink> sink_;
  std::vector<std::thread> sessions_;
  LinkTimeouts timeouts_;
  WireFaultFn to_sink_, to_source_;
  std::string trace_;
};

TEST(Simulation, SeededFaultSchedulesLoseNothing) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("cairn-sim-" + std::to_string(getpid()));
  Counters c;
  sim::RunSeeds(sim::Seeds(1), "Simulation.SeededFaultSchedules*", [&](uint64_t seed) {
    World w(seed, dir);
    w.Run(c);
    ++c.schedules;
    return w.trace();
  });
  std::filesystem::remove_all(dir);
  std::printf(
      "[          ] simulation: %lu schedules, %lu faults injected, %lu epochs failed and "
      "retried, %lu restore points verified by content, %lu bytes compared\n",
      static_cast<unsigned long>(c.schedules), static_cast<unsigned long>(c.faults),
      static_cast<unsigned long>(c.epochs_failed), static_cast<unsigned long>(c.points_verified),
      static_cast<unsigned long>(c.bytes_compared));
  std::printf("[          ] faults by kind: %s\n",
              sim::KindCounts(c.by_kind, static_cast<int>(Fault::kCount), FaultName).c_str());
}

}  // namespace
}  // namespace cairn
