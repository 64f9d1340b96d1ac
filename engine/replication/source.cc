// SourceReplicator: its life (start, stop, on-demand epochs, status) and
// the loop that decides when an epoch is due.

#include "engine/replication/source.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <system_error>
#include <utility>

#include "engine/base/thread_stack.h"
#include "engine/catalog/catalog.h"
#include "proto/cairn.pb.h"

namespace cairn {

SourceReplicator::SourceReplicator(VolumeConfig config, std::string site,
                                   std::shared_ptr<Pool> pool, Connector connect,
                                   LinkTimeouts timeouts)
    : config_(std::move(config)),
      site_(std::move(site)),
      pool_(std::move(pool)),
      connect_(std::move(connect)),
      timeouts_(timeouts) {
  status_.volume = config_.id;
  status_.role = "source";
  status_.state = VolumeState::kIdle;
  status_.pool = config_.pool;
  status_.image = config_.image;
  status_.peer = fmt::format("{}:{}", config_.peer_host, config_.peer_port);
}

SourceReplicator::~SourceReplicator() { Stop(); }

void SourceReplicator::Start() {
  std::lock_guard lock(mu_);
  if (thread_.joinable()) return;
  stop_ = false;
  thread_ = std::thread([this] { Loop(); });
}

void SourceReplicator::RequestStop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    if (link_) link_->Close();
    if (verify_link_) verify_link_->Close();
  }
  cv_.notify_all();
  if (budget_) budget_->Wake();  // an epoch waiting for memory gives up
}

void SourceReplicator::Stop() {
  RequestStop();
  {
    std::lock_guard lock(verify_mu_);
    if (verify_thread_.joinable()) verify_thread_.join();
  }
  if (thread_.joinable()) {
    thread_.join();
    // As with the link: a later Start opens the image and lists anew.
    vol_.reset();
    ahead_snaps_.reset();
  }
}

StatusOr<HandedBack> SourceReplicator::HandBack(uint64_t seq) {
  if (seq == 0) return InvalidArgument("hand back: no restore point");
  ASSIGN_OR_RETURN(auto link, connect_());
  ASSIGN_OR_RETURN(const SinkHello reply, Handshake(*link, false, seq));
  link->Close();
  if (reply.last_applied_seq != seq) {
    return FailedPrecondition(
        fmt::format("sink of site '{}' answered the hand-back of restore "
                    "point {} of '{}' with point {}",
                    reply.site, seq, config_.id, reply.last_applied_seq));
  }
  spdlog::warn(
      "volume {}: handed back to site '{}' at restore point {}: {}/{} there is the "
      "volume's primary again",
      config_.id, reply.site, seq, config_.target_pool, config_.target_image);
  return HandedBack{reply.site, reply.last_chain, reply.last_point_time_ns};
}

StatusOr<std::string> SourceReplicator::StandingDown() {
  if (!stand_down_) return std::string();
  ASSIGN_OR_RETURN(std::string why, stand_down_());
  std::lock_guard lock(mu_);
  if (!why.empty()) {
    if (status_.state != VolumeState::kStandby) {
      spdlog::warn("volume {}: standing by: {}", config_.id, why);
    }
    status_.state = VolumeState::kStandby;
    status_.error.clear();
    return why;
  }
  if (status_.state == VolumeState::kStandby) {
    // Handed back: the other site's sink took snapshots of this image
    // meanwhile; promises come from a fresh listing.
    spdlog::warn("volume {}: {}/{} is this volume's primary again: replicating", config_.id,
                 config_.pool, config_.image);
    snaps_known_ = false;
    status_.state = VolumeState::kIdle;
  }
  return std::string();
}

StatusOr<ImageGate::Token> SourceReplicator::SnapshotPass() {
  ImageGate::Token pass;
  if (gate_) {
    auto begun = gate_->BeginSnapshot(config_.pool, config_.image);
    if (!begun.ok()) return begun.status().Annotate(fmt::format("volume {}", config_.id));
    pass = std::move(begun).value();
  }
  // Asked with the pass held: a sink here that takes the image from now
  // on finds the snapshot in its listing, or this finds the sink's claim.
  ASSIGN_OR_RETURN(const std::string why, StandingDown());
  if (!why.empty()) {
    return FailedPrecondition(fmt::format("volume {}: no snapshot of {}/{} is taken from here: {}",
                                          config_.id, config_.pool, config_.image, why));
  }
  return pass;
}

void SourceReplicator::ShipInstant(uint64_t seq) {
  std::lock_guard lock(mu_);
  wanted_seq_ = std::max(wanted_seq_, seq);
  cv_.notify_all();
}

StatusOr<uint64_t> SourceReplicator::RequestNow() {
  // A group member's points are the group's instants.
  if (member()) return group_.request_now();
  ASSIGN_OR_RETURN(const std::string standing_down, StandingDown());
  if (!standing_down.empty()) {
    return FailedPrecondition(fmt::format(
        "volume {}: {}/{} is the standby of the volume's primary at another site (failed over); "
        "fail back there (`cairn failback {}`) before it replicates from here",
        config_.id, config_.pool, config_.image, config_.id));
  }
  // Every cairn.<N> snapshot that exists now may predate the caller's
  // writes; a snapshot created from here on gets a higher seq (new ones are
  // numbered max + 1) and holds them. So the promise is max + 1, from the
  // image itself, not from what this process has seen so far. Without the
  // listing there is no promise: a restarted cairnd knows nothing yet of the
  // snapshots its predecessor took, and a point among them may miss the
  // caller's writes. Once this process listed them, it took every later
  // one itself (highest_snap_).
  {
    std::lock_guard lock(mu_);
    if (snaps_known_) {
      wanted_seq_ = std::max({wanted_seq_, highest_snap_ + 1, status_.last_seq + 1});
      cv_.notify_all();
      return wanted_seq_;
    }
  }
  auto listed = [&]() -> StatusOr<uint64_t> {
    ASSIGN_OR_RETURN(auto vol, pool_->Open(config_.image));
    ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
    uint64_t newest = 0;
    for (const auto& s : snaps) newest = std::max(newest, ParseSnapName(s.name).value_or(0));
    return newest;
  }();
  if (!listed.ok()) {
    return listed.status().Annotate(
        fmt::format("volume {}: no restore point can be promised without the snapshots of {}/{}",
                    config_.id, config_.pool, config_.image));
  }
  std::lock_guard lock(mu_);
  wanted_seq_ = std::max({wanted_seq_, *listed + 1, highest_snap_ + 1, status_.last_seq + 1});
  cv_.notify_all();
  return wanted_seq_;
}

VolumeStatusInfo SourceReplicator::Report() const {
  std::lock_guard lock(mu_);
  VolumeStatusInfo s = status_;
  if (s.state == VolumeState::kSyncing) {
    s.epoch_sent_bytes = epoch_sent_bytes_.load(std::memory_order_relaxed);
  }
  s.wire_bytes_total = wire_bytes_total_.load(std::memory_order_relaxed);
  if (s.last_point_time_ns > 0) {
    s.lag_seconds = (clock_->UnixNs() - std::max(s.last_point_time_ns, unchanged_at_ns_)) / 1e9;
  }
  return s;
}

StatusOr<EpochSummary> SourceReplicator::RunOnce() {
  if (!link_) {
    Status st = Connect();
    if (!st.ok()) return st.Annotate(fmt::format("connecting to sink {}", status_.peer));
    std::lock_guard lock(mu_);
    if (sink_seq_ > status_.last_seq) {  // a restarted source learns its newest point
      status_.last_seq = sink_seq_;
      status_.last_point_time_ns = sink_point_time_ns_;
    }
  }
  const bool stopping = [&] {
    std::lock_guard lock(mu_);
    return stop_;
  }();
  if (stopping) {  // Stop() came while connecting: ship nothing more
    Disconnect();
    return Aborted("stopping");
  }
  if (vol_ && !ahead_snaps_) {
    // The plan's listing, taken here: an image removed and made again
    // under its name since the last epoch is opened afresh at once (no
    // failed attempt), the kept volume being of the old one.
    auto listed = vol_->ListSnaps();
    if (listed.ok()) {
      ahead_snaps_ = std::move(listed).value();
    } else if (listed.status().code() == Code::kNotFound) {
      vol_.reset();
    }
  }
  if (!vol_) {
    auto vol = pool_->Open(config_.image);
    if (!vol.ok()) {
      return vol.status().Annotate(fmt::format("opening {}/{}", config_.pool, config_.image));
    }
    vol_ = std::move(vol).value();
  }
  auto sum = ShipEpoch(*vol_);
  // After any failure the stream's position is unknown: start afresh.
  if (!sum.ok()) Disconnect();
  return sum;
}

void SourceReplicator::Disconnect() {
  {
    std::lock_guard lock(mu_);
    if (link_) link_->Close();
    link_.reset();
  }
  // The image is opened afresh with the next link (it may have been
  // recreated meanwhile), and the next plan lists its snapshots anew.
  vol_.reset();
  ahead_snaps_.reset();
}

bool SourceReplicator::UnchangedSincePoint() {
  // Only with everything shipped: a point made by this process, no
  // snapshot pending, the image open since.
  {
    std::lock_guard lock(mu_);
    if (point_snap_.id == 0 || highest_snap_ != sink_seq_ ||
        point_snap_.name != SnapName(sink_seq_)) {
      return false;
    }
  }
  if (!vol_) return false;
  const int64_t asked_at = clock_->UnixNs();  // what was written before is seen
  auto changed = vol_->ChangedSince(point_snap_);
  if (!changed.ok()) {
    spdlog::debug("volume {}: cannot tell whether {} changed since {}: {}", config_.id,
                  config_.image, point_snap_.name, changed.status().ToString());
    return false;
  }
  if (*changed) return false;
  SendUnchanged(asked_at);
  return true;
}

void SourceReplicator::NoteUnchanged(int64_t as_of_ns) {
  std::lock_guard lock(mu_);
  group_unchanged_ns_ = std::max(group_unchanged_ns_, as_of_ns);
  cv_.notify_all();
}

void SourceReplicator::SendUnchanged(int64_t as_of_ns) {
  {
    std::lock_guard lock(mu_);
    // Only with everything shipped: the newest snapshot is the point.
    if (sink_seq_ == 0 || highest_snap_ != sink_seq_) return;
    unchanged_at_ns_ = std::max(unchanged_at_ns_, as_of_ns);
    ++status_.unchanged_checks_total;
  }
  if (link_ && sink_takes_unchanged_) {
    // The standby hears it too: its lag for this volume counts from then.
    pb::Unchanged u;
    u.set_seq(sink_seq_);
    u.set_as_of_ns(as_of_ns);
    if (Status st = link_->Send(FrameType::kUnchanged, u.SerializeAsString(), {}); !st.ok()) {
      spdlog::debug("volume {}: could not tell the sink the image is unchanged: {}", config_.id,
                    st.ToString());
      Disconnect();  // the next epoch connects afresh
    }
  }
}

void SourceReplicator::ConnectFirst(Schedule& s) {
  Status st = Connect();
  std::lock_guard lock(mu_);
  if (st.ok()) {
    status_.last_seq = std::max(status_.last_seq, sink_seq_);
    status_.state = VolumeState::kIdle;
  } else if (!stop_) {
    s.last_error = st.Annotate(fmt::format("connecting to sink {}", status_.peer)).ToString();
    status_.error = s.last_error;
    status_.state = VolumeState::kDisconnected;
    spdlog::warn("volume {}: {}", config_.id, s.last_error);
  }
}

Clock::TimePoint SourceReplicator::WakeAt(const Schedule& s, Clock::TimePoint now, bool due) const {
  const bool periodic = config_.interval.count() > 0 && !member();
  if (now < s.retry_at) {
    auto wake = due || !periodic ? s.retry_at : std::max(s.next, s.retry_at);
    if (s.outage && periodic) wake = std::min(wake, s.next);
    return wake;
  }
  return periodic ? s.next : Clock::kForever;
}

Clock::TimePoint SourceReplicator::NextIdleCheck() const {
  // The next check of an idle volume falls on a whole tick (a tenth of the
  // interval, at most a second), with those of the other idle volumes due
  // in it: their RADOS ops then go out together, and the client's
  // messenger wakes once for many.
  using D = Clock::Duration;
  const D tick = std::max<D>(std::min<D>(std::chrono::seconds(1), config_.interval / 10),
                             std::chrono::milliseconds(1));
  const D due = (clock_->Now() + config_.interval).time_since_epoch();
  return Clock::TimePoint((due + tick - D(1)) / tick * tick);
}

void SourceReplicator::Loop() {
  // A group member ships the instants its group takes, on no schedule of
  // its own.
  const bool periodic = config_.interval.count() > 0 && !member();
  Schedule s;
  s.next = s.retry_at = clock_->Now();
  ConnectFirst(s);
  std::unique_lock lock(mu_);
  while (!stop_) {
    const auto now = clock_->Now();
    const bool outage_snapshot = s.outage && periodic && now >= s.next && now < s.retry_at;
    // Asked only after something went wrong, or while standing by: the
    // other site must have failed the volume over (its sink refuses this
    // one from then on) before a sink here can own the image. So a
    // healthy volume's idle checks cost no catalog read.
    const bool unwell = s.outage || status_.state != VolumeState::kIdle || !status_.error.empty();
    if (stand_down_ && unwell &&
        (outage_snapshot ||
         (now >= s.retry_at && (wanted_seq_ > status_.last_seq || (periodic && now >= s.next))))) {
      // Nothing is sent or snapshotted while another site's sink writes
      // this image (failed over there, replicating back here).
      lock.unlock();
      auto standing_down = StandingDown();
      if (!standing_down.ok() || !standing_down->empty()) Disconnect();
      lock.lock();
      if (!standing_down.ok() || !standing_down->empty()) {
        if (!standing_down.ok()) {
          status_.error = standing_down.status()
                              .Annotate("cannot tell whether this image is another site's standby")
                              .ToString();
          status_.state = VolumeState::kError;
        }
        s.outage = false;
        s.next = s.retry_at =
            clock_->Now() + std::max<Clock::Duration>(config_.interval, std::chrono::seconds(1));
        continue;
      }
    }
    if (outage_snapshot) {
      // The schedule goes on while the sink is unreachable.
      lock.unlock();
      TakeOutageSnapshot();
      lock.lock();
      s.next = clock_->Now() + config_.interval;
      continue;
    }
    const bool due = wanted_seq_ > status_.last_seq || (periodic && now >= s.next);
    if (!due && group_unchanged_ns_ != 0) {
      const int64_t as_of = std::exchange(group_unchanged_ns_, 0);
      lock.unlock();
      SendUnchanged(as_of);
      lock.lock();
      continue;
    }
    if (now < s.retry_at || !due) {
      // Most of a volume's life is this wait: its deep stack goes back.
      ReleaseStackBelowHere();
      clock_->WaitUntil(lock, cv_, WakeAt(s, now, due));
      continue;
    }
    if (!s.outage && wanted_seq_ <= status_.last_seq) {
      // Due by the schedule alone: an image that did not change since the
      // newest point costs no snapshot, no epoch, no point.
      lock.unlock();
      const bool unchanged = UnchangedSincePoint();
      lock.lock();
      if (unchanged) {
        s.next = NextIdleCheck();
        s.carried_due.reset();
        continue;
      }
    }
    RunScheduledEpoch(s, lock);
  }
}

void SourceReplicator::RunScheduledEpoch(Schedule& s, std::unique_lock<std::mutex>& lock) {
  const bool periodic = config_.interval.count() > 0 && !member();
  lock.unlock();
  const auto started = clock_->Now();
  // The next snapshot is due an interval after this epoch's: taken at its
  // start, or by the helper of the epoch before (then counted from then).
  next_due_at_ =
      periodic ? std::optional(s.carried_due.value_or(started + config_.interval)) : std::nullopt;
  s.carried_due.reset();
  ahead_taken_at_.reset();
  auto r = RunOnce();
  // Until the next epoch the image is not held open (see CloseHandles).
  if (vol_) vol_->CloseHandles();
  // When the next snapshot is due: as the epoch began, or an interval
  // after the snapshot it took itself (ShipEpoch).
  const auto snap_due = next_due_at_.value_or(started + config_.interval);
  next_due_at_.reset();
  lock.lock();
  if (r.ok()) {
    s.backoff = std::chrono::milliseconds(500);
    s.last_error.clear();
    s.outage = false;
    if (ahead_taken_at_ && periodic) {
      // The next epoch's snapshot exists: ship it now.
      s.carried_due = *ahead_taken_at_ + config_.interval;
      s.next = clock_->Now();
    } else {
      s.next = snap_due;
    }
    s.retry_at = clock_->Now();
    return;
  }
  if (stop_) return;  // the epoch was cut by Stop(): nothing went wrong
  const std::string msg = r.status().ToString();
  status_.error = msg;
  status_.errors_total++;
  const Code code = r.status().code();
  status_.state = code == Code::kUnavailable || code == Code::kAborted ? VolumeState::kDisconnected
                                                                       : VolumeState::kError;
  if (msg != s.last_error) spdlog::error("volume {}: {}", config_.id, msg);
  s.last_error = msg;
  s.outage = true;
  s.retry_at = clock_->Now() + s.backoff;
  s.backoff = std::min(s.backoff * 2, std::chrono::milliseconds(30'000));
}

}  // namespace cairn
