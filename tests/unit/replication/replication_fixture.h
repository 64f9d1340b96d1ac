// The fixture of the replication tests: the real source and sink over
// in-process links (with faults on demand) and in-memory volumes, site A's
// pool, site B's (behind a FaultPool) and the sink's catalog.
#pragma once

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/base/clock.h"
#include "engine/link/fault_link.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"
#include "engine/spool/file_spool_store.h"
#include "engine/volume/fault_pool.h"
#include "engine/volume/memory_volume.h"
#include "tests/unit/test_util.h"

namespace cairn {

constexpr uint64_t kMiB = 1 << 20;

// A Link that flips one bit in the payload of the Nth data frame it sends.
class FlipNthPayload final : public Link {
 public:
  FlipNthPayload(std::unique_ptr<Link> inner, int n) : inner_(std::move(inner)), n_(n) {}
  Status Send(FrameType t, std::string_view body, std::span<const char> payload) override {
    const bool data = t == FrameType::kRecord || t == FrameType::kCompressedRecord;
    if (data && !payload.empty() && n_-- == 0) {
      std::vector<char> copy(payload.begin(), payload.end());
      copy[copy.size() / 2] ^= 0x04;
      return inner_->Send(t, body, copy);
    }
    return inner_->Send(t, body, payload);
  }
  StatusOr<Frame> Receive(std::chrono::milliseconds t) override { return inner_->Receive(t); }
  void Close() override { inner_->Close(); }
  const std::string& peer() const override { return inner_->peer(); }

 private:
  std::unique_ptr<Link> inner_;
  int n_;
};

// Polls `pred` until it holds; fails the test with `what` after 10 s.
inline void PollUntil(const std::string& what, const std::function<bool()>& pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!pred()) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "timed out waiting for " << what;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

class ReplicationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spool_ = std::filesystem::temp_directory_path() /
             ("cairn-repl-" + std::to_string(getpid()) + "-" +
              ::testing::UnitTest::GetInstance()->current_test_info()->name());
    site_a_ = std::make_shared<MemoryPool>("rbd");
    site_b_ = std::make_shared<MemoryPool>("rbd");
    fault_b_ = std::make_shared<FaultPool>(*site_b_);
    catalog_ = std::make_shared<MemoryKvStore>();
    SinkEnv env;
    env.site = "b";
    env.spools = std::make_shared<FileSpoolStore>(spool_);
    env.pools = {"rbd"};
    env.open_pool = [this](const std::string& p) -> StatusOr<std::shared_ptr<Pool>> {
      if (p != "rbd") return NotFound("pool " + p + " does not exist");
      return std::shared_ptr<Pool>(fault_b_);
    };
    env.open_catalog = [this](const std::string&) -> StatusOr<std::shared_ptr<KvStore>> {
      return std::shared_ptr<KvStore>(catalog_);
    };
    env.retry_min = std::chrono::milliseconds(20);  // the sink's own apply retries
    env.retry_max = std::chrono::milliseconds(100);
    sink_env_ = env;
    sink_ = std::make_unique<Sink>(env);
  }
  void TearDown() override {
    for (auto& t : sessions_) t.join();
    std::filesystem::remove_all(spool_);
  }

  // Each connect makes a link pair and serves the sink end on a thread.
  SourceReplicator::Connector Connector() {
    return [this]() -> StatusOr<std::unique_ptr<Link>> {
      auto frames = std::make_shared<int>(0);
      sent_records_ = frames;
      const int cut = cut_at_frame_;
      cut_at_frame_ = -1;
      auto [memory_a, memory_b] = MakeMemoryLinkPair(16u << 20);
      auto a =
          std::make_unique<FaultLink>(std::move(memory_a), [this, frames, cut](std::string& bytes) {
            const auto type = static_cast<FrameType>(static_cast<uint8_t>(bytes[6]));
            if (type == FrameType::kEpochEnd && on_epoch_end_) on_epoch_end_();
            if (cut >= 0 && (*frames) == cut) return WireFault::kCut;
            if (type == FrameType::kRecord) ++*frames;
            if (type == FrameType::kCompressedRecord) {
              ++*frames;
              ++compressed_frames_;
            }
            return WireFault::kDeliver;
          });
      auto b = std::make_unique<FaultLink>(std::move(memory_b), [this](std::string& bytes) {
        const auto type = static_cast<FrameType>(static_cast<uint8_t>(bytes[6]));
        if (type == FrameType::kEpochAck && on_ack_) on_ack_();
        return WireFault::kDeliver;
      });
      std::unique_ptr<Link> src = std::move(a);
      if (flip_next_ >= 0) src = std::make_unique<FlipNthPayload>(std::move(src), flip_next_);
      flip_next_ = -1;
      // How a session ends is seen in the source's and sink's status.
      sessions_.emplace_back([this, l = std::move(b)]() mutable {
        [[maybe_unused]] const Status ended = sink_->Serve(*l);
      });
      return src;
    };
  }

  VolumeConfig Config() {
    VolumeConfig c;
    c.id = "vol1";
    c.pool = "rbd";
    c.image = "img";
    c.target_pool = "rbd";
    c.target_image = "img-standby";
    c.keep_snapshots = 100;  // keep source snapshots to compare against
    c.block_size = 256 * 1024;
    return c;
  }

  // Every point in the catalog equals, by content, the source snapshot
  // of the same seq; there are `expect` of them (at least that many if
  // `at_least`). Of volume `vol`, replicated into `target`.
  void VerifyAllPoints(Volume& src, size_t expect, bool at_least = false,
                       const std::string& vol = "vol1", const std::string& target = "img-standby") {
    auto pts = sink_->Points(vol);
    ASSERT_TRUE(pts.ok()) << pts.status().ToString();
    if (at_least) {
      ASSERT_GE(pts->size(), expect);
    } else {
      ASSERT_EQ(pts->size(), expect);
    }
    auto dst = testing::MustOpen(*site_b_, target);
    for (const auto& p : *pts) {
      EXPECT_EQ(testing::ImageHash(*dst, p.snap, p.epoch.image_size),
                testing::ImageHash(src, SnapName(p.epoch.seq), p.epoch.image_size))
          << "restore point " << p.epoch.seq;
    }
  }

  // From here on the sink reads time from clock_, and site A stamps its
  // snapshots with it; a replicator does so after set_clock(clock_). For
  // tests of the schedule: they advance the clock instead of sleeping.
  // Call first, before the test creates any image.
  void UseManualClock() {
    MemoryPoolOptions o;
    o.now_ns = [this] { return clock_.UnixNs(); };
    site_a_ = std::make_shared<MemoryPool>("rbd", o);
    sink_env_.clock = &clock_;
    RestartSink(sink_env_);
  }
  // Advances clock_ by `d` once a thread waits on it for a deadline (the
  // replicator's loop between epochs), so time moves while it waits.
  ::testing::AssertionResult AdvanceWhenParked(Clock::Duration d) {
    if (!clock_.AwaitDeadlines(1, std::chrono::seconds(10))) {
      return ::testing::AssertionFailure() << "the replicator never waited for its next deadline";
    }
    clock_.Advance(d);
    return ::testing::AssertionSuccess();
  }
  // Advances clock_ by `step`, each time something waits on it, until
  // `pred` holds.
  ::testing::AssertionResult AdvanceUntil(const std::string& what, Clock::Duration step,
                                          const std::function<bool()>& pred) {
    for (int i = 0; !pred(); ++i) {
      if (i == 1000) return ::testing::AssertionFailure() << what << ": not after 1000 steps";
      if (auto r = AdvanceWhenParked(step); !r) return r << " (waiting for " << what << ")";
    }
    return ::testing::AssertionSuccess();
  }

  // A sink process restarted (with `env`): the old one is gone first.
  void RestartSink(const SinkEnv& env) {
    for (auto& t : sessions_) t.join();
    sessions_.clear();
    sink_.reset();
    sink_ = std::make_unique<Sink>(env);
  }

  // Declared first: it outlives the sink and replicators that wait on it.
  ManualClock clock_;
  std::filesystem::path spool_;
  SinkEnv sink_env_;
  std::shared_ptr<MemoryPool> site_a_, site_b_;
  std::shared_ptr<FaultPool> fault_b_;  // site_b_ with faults: what the sink uses
  std::shared_ptr<MemoryKvStore> catalog_;
  std::unique_ptr<Sink> sink_;
  std::vector<std::thread> sessions_;
  int flip_next_ = -1;
  std::atomic<int> compressed_frames_{0};  // CompressedRecord frames the sources sent
  int cut_at_frame_ = -1;                  // cut the next link after this many records
  std::function<void()> on_epoch_end_;     // runs as the source sends an EpochEnd
  std::function<void()> on_ack_;           // runs as the sink sends an EpochAck
  std::shared_ptr<int> sent_records_;      // records sent on the newest link
};

}  // namespace cairn
