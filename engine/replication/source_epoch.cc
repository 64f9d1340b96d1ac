// SourceReplicator: one epoch, from the handshake with the sink to the acks
// (ShipEpoch), and the snapshots it takes, keeps and prunes.

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <system_error>

#include "engine/base/thread_stack.h"
#include "engine/catalog/catalog.h"
#include "engine/epoch/block_digests.h"
#include "engine/replication/source.h"
#include "proto/cairn.pb.h"

namespace cairn {

StatusOr<SnapInfo> SourceReplicator::SnapshotToShip(const std::map<uint64_t, SnapInfo>& ours) {
  // A snapshot taken but not yet applied at the sink is shipped first.
  if (auto pending = ours.upper_bound(sink_seq_); pending != ours.end()) {
    // From now on the sink may hold a durable prefix of this epoch: the
    // snapshot must stay until it is applied.
    std::erase(outage_snaps_, pending->first);
    return pending->second;
  }
  const uint64_t seq = std::max(sink_seq_, ours.empty() ? 0 : ours.rbegin()->first) + 1;
  ASSIGN_OR_RETURN(const ImageGate::Token pass, SnapshotPass());
  ReserveSnap(seq);
  // The next snapshot is due an interval after this one is begun (not
  // after the connect and the plan that came before it).
  if (next_due_at_) next_due_at_ = clock_->Now() + config_.interval;
  std::vector<SnapInfo> after;
  {
    // A handle of its own, closed right after: the epoch then reads only
    // snapshots, so a crash mid-epoch leaves no watch on the primary to
    // stall the next snapshot (the guest's or ours). The handle that took
    // the snapshot knows it: it lists it without another open.
    ASSIGN_OR_RETURN(auto head, pool_->Open(config_.image));
    RETURN_IF_ERROR(head->CreateSnap(SnapName(seq)));
    ASSIGN_OR_RETURN(after, head->ListSnaps());
  }
  auto it = std::find_if(after.begin(), after.end(),
                         [&](const SnapInfo& s) { return s.name == SnapName(seq); });
  if (it == after.end()) return Internal("snapshot vanished right after it was created");
  return *it;
}

StatusOr<SnapInfo> SourceReplicator::InstantToShip(const EpochStart& e) const {
  auto pending = e.ours.upper_bound(sink_seq_);
  if (pending == e.ours.end()) {
    return FailedPrecondition(
        fmt::format("volume {}: group {} has taken no instant after restore point {} yet",
                    config_.id, group_.group, sink_seq_));
  }
  return e.instants.at(pending->first);
}

void SourceReplicator::SortInstants(const std::vector<SnapInfo>& snaps, EpochStart* e) const {
  for (const auto& s : snaps) {
    if (!IsGroupSnapName(s.name)) continue;
    if (auto seq = ParseSnapName(std::string_view(s.name).substr(kGroupSnapPrefix.size()))) {
      e->instants[*seq] = s;
    }
  }
  std::erase_if(e->ours, [&](const auto& kv) {
    return kv.first > sink_seq_ && !e->instants.contains(kv.first);
  });
}

std::string SourceReplicator::PointSnapName(uint64_t seq) const {
  return member() ? GroupSnapName(SnapName(seq)) : SnapName(seq);
}

bool SourceReplicator::DecideResync(EpochStart& e) {
  // The base of the next epoch is gone (the image was recreated, or its
  // snapshot removed by hand), or the snapshot of that name is of another
  // history (taken at another time than the sink's point: a recreated
  // image, or numbers reused across a failover): the next epoch resends
  // the whole image.
  // (The base point this source named in its Hello was checked by the sink
  // itself, against its own snapshot: the two were taken at two times.)
  auto base = e.ours.find(sink_seq_);
  // A group member's point was read from its instant's group snapshot:
  // that is the one whose time the sink's point carries.
  const SnapInfo* read = nullptr;
  if (member()) {
    if (auto i = e.instants.find(sink_seq_); i != e.instants.end()) read = &i->second;
  } else if (base != e.ours.end()) {
    read = &base->second;
  }
  const bool other = base != e.ours.end() && read && sink_point_time_ns_ != 0 &&
                     sink_seq_ != pinned_seq_.load(std::memory_order_relaxed) &&
                     read->time_ns != sink_point_time_ns_;
  {
    std::lock_guard lock(mu_);
    // A repair compares with the sink's point by digests, even though the
    // base snapshot is here: what the sink holds is in question.
    e.repair = repair_ && sink_seq_ > 0 && sink_serves_digests_;
  }
  const bool resync = (sink_seq_ > 0 && (base == e.ours.end() || other)) ||
                      (sink_seq_ == 0 && sink_resync_base_) || e.repair;
  if (e.repair) {
    spdlog::warn(
        "volume {}: repair: the next epoch compares the whole image with restore point {} at the "
        "sink by block digests and sends only the blocks that differ",
        config_.id, sink_seq_);
  } else if (sink_seq_ == 0 && sink_resync_base_) {
    spdlog::warn(
        "volume {}: the sink's image {}/{} holds data of its own and no restore point: the first "
        "epoch compares the whole image with it by block digests (only blocks that differ are "
        "sent)",
        config_.id, config_.target_pool, config_.target_image);
  } else if (resync) {
    spdlog::warn(
        "volume {}: the sink's newest restore point is {} but image {}/{} has no "
        "snapshot {}{}: resyncing the whole image{}",
        config_.id, sink_seq_, config_.pool, config_.image, SnapName(sink_seq_),
        other ? fmt::format(" taken at {} ns (its snapshot of that name was taken at "
                            "{} ns: another history)",
                            sink_point_time_ns_, base->second.time_ns)
              : "",
        sink_serves_digests_ ? " by block digests (only blocks that differ are sent)"
                             : " (the sink takes no digests: every byte is sent)");
  }
  return resync;
}

StatusOr<SourceReplicator::EpochStart> SourceReplicator::PlanEpoch(Volume& vol) {
  // Listed already: by the helper of the epoch before as it took this
  // epoch's snapshot, or by RunOnce as it checked the image is the one
  // kept open. Another listing would cost an image open more.
  std::vector<SnapInfo> snaps;
  if (ahead_snaps_) {
    snaps = std::move(*ahead_snaps_);
    ahead_snaps_.reset();
  } else {
    ASSIGN_OR_RETURN(snaps, vol.ListSnaps());
  }
  EpochStart e;
  for (auto& s : snaps) {
    if (auto seq = ParseSnapName(s.name)) e.ours[*seq] = s;
  }
  if (member()) SortInstants(snaps, &e);
  const bool resync = DecideResync(e);
  if (member()) {
    ASSIGN_OR_RETURN(e.to, InstantToShip(e));
  } else {
    ASSIGN_OR_RETURN(e.to, SnapshotToShip(e.ours));
  }
  const uint64_t seq =
      ParseSnapName(member() ? std::string_view(e.to.name).substr(kGroupSnapPrefix.size())
                             : std::string_view(e.to.name))
          .value();
  {
    std::lock_guard lock(mu_);
    highest_snap_ =
        std::max(highest_snap_, e.ours.empty() ? seq : std::max(seq, e.ours.rbegin()->first));
    snaps_known_ = true;
    status_.state = VolumeState::kSyncing;
  }
  EpochPlan& plan = e.plan;
  plan.id.volume = config_.id;
  plan.id.seq = seq;
  plan.id.base_seq = sink_seq_;
  plan.from_snap = sink_seq_ && !resync ? SnapName(sink_seq_) : "";
  plan.resync = resync;
  plan.to_snap = e.to.name;
  plan.to_snap_id = e.to.id;
  if (!plan.from_snap.empty()) plan.from_snap_id = e.ours.at(sink_seq_).id;
  plan.id.image_size = e.to.size;
  plan.id.snap_time_ns = e.to.time_ns;
  plan.prev_chain = sink_chain_;
  plan.id.source_site = site_;
  if (member()) {
    plan.id.group = group_.group;
    plan.id.group_members = group_.members_at(seq);
  }
  // After a cut the sink keeps what it verified and made durable: send the
  // rest only. (The same snapshots and options rebuild the same records; if
  // they did not, the sink's verifier refuses and the epoch starts over.)
  if (resume_seq_ == seq) plan.skip_records = resume_records_;
  resume_seq_ = resume_records_ = 0;
  return e;
}

StatusOr<std::optional<MemoryBudget::Lease>> SourceReplicator::BorrowReadWindow(uint64_t image_size,
                                                                                SendOptions* opt) {
  if (!budget_) return std::optional<MemoryBudget::Lease>();
  const uint64_t blocks =
      std::max<uint64_t>(1, (image_size + opt->block_size - 1) / opt->block_size);
  const uint64_t want = std::min<uint64_t>(opt->window, blocks) * opt->block_size;
  auto memory = budget_->Acquire(want, opt->block_size, [this] {
    std::lock_guard lock(mu_);
    return stop_;
  });
  if (!memory) return Aborted("stopping");
  opt->window = static_cast<uint32_t>(std::max<uint64_t>(1, memory->bytes() / opt->block_size));
  return memory;
}

// The helper thread beside one epoch (TakeAhead). Every way out of the
// epoch ends it; a failed epoch's helper begins nothing more. A snapshot it
// took ahead of an epoch that then failed counts among the outage
// snapshots from then on: bounded by outage_snapshots like them.
class SourceReplicator::AheadThread {
 public:
  AheadThread(SourceReplicator& r, uint64_t seq, const SnapInfo& to, bool may_take,
              uint64_t prune_base)
      : r_(r), seq_(seq) {
    {
      std::lock_guard lock(r_.mu_);
      r_.ahead_mode_ = AheadMode::kSending;
    }
    try {
      thread_ = std::thread([this, to, may_take, prune_base, due = r_.next_due_at_] {
        r_.TakeAhead(seq_, to, may_take, prune_base, due, &ahead_);
      });
    } catch (const std::system_error& e) {
      // No thread to be had: the epoch goes on, the next one takes its own
      // snapshot and the removals wait.
      spdlog::warn("volume {}: no helper thread beside epoch {}: {}", r_.config_.id, seq, e.what());
    }
  }
  AheadThread(const AheadThread&) = delete;
  AheadThread& operator=(const AheadThread&) = delete;

  ~AheadThread() {
    End(AheadMode::kCancel);
    auto& outage = r_.outage_snaps_;
    if (!point_made_ && ahead_.took &&
        std::find(outage.begin(), outage.end(), seq_ + 1) == outage.end()) {
      outage.push_back(seq_ + 1);
    }
  }

  // The send is through: the helper may take the next snapshot once due.
  void SendDone() { Tell(AheadMode::kSent); }

  // The point is made: the helper still takes the next snapshot if it is
  // due by now, and is joined. What it did is then result().
  void PointMade() {
    End(AheadMode::kEpochDone);
    point_made_ = true;
  }
  const Ahead& result() const { return ahead_; }

 private:
  void Tell(AheadMode mode) {
    {
      std::lock_guard lock(r_.mu_);
      r_.ahead_mode_ = mode;
    }
    r_.cv_.notify_all();
  }
  void End(AheadMode mode) {
    if (!thread_.joinable()) return;
    Tell(mode);
    thread_.join();
    if (ahead_.pruned) r_.prune_deferred_ = false;
  }

  SourceReplicator& r_;
  const uint64_t seq_;
  Ahead ahead_;
  bool point_made_ = false;
  std::thread thread_;
};

StatusOr<EpochSummary> SourceReplicator::SendAndAwaitAcks(Volume& vol, const EpochStart& start,
                                                          const SendOptions& opt,
                                                          AheadThread& ahead, EpochTimes* times) {
  const EpochPlan& plan = start.plan;
  epoch_sent_bytes_.store(0, std::memory_order_relaxed);
  WatchedWriter wire(*link_, &epoch_sent_bytes_);
  auto sent = SendEpoch(vol, plan, opt, wire, &times->send_detail);
  if (!sent.ok()) {
    if (!wire.failed()) {
      // The epoch failed here (a read, a snapshot gone): the sink hears why
      // in place of the epoch's end, discards it and shows the error.
      (void)WriteLinkError(*link_, sent.status());
      return sent.status();
    }
    // A sink that refuses mid-epoch (spool full, a corrupt frame) says why
    // before it closes; that beats "connection reset".
    if (auto f = link_->Receive(std::chrono::milliseconds(500));
        f.ok() && f->type == FrameType::kLinkError) {
      return StatusFromLinkError(*f, "sink");
    }
    return sent.status();
  }
  times->send = clock_->SecondsSince(times->begun);
  // The next epoch reads another snapshot: this one's handle is closed
  // while the sink finishes, not kept open for the interval.
  vol.CloseSnapshotHandles();
  ahead.SendDone();
  const auto t_durable = clock_->Now();
  RETURN_IF_ERROR(AwaitAck(plan.id.seq, pb::EpochAck::DURABLE, nullptr));
  times->durable = clock_->SecondsSince(t_durable);
  const auto t_applied = clock_->Now();
  {
    std::lock_guard lock(mu_);
    status_.state = VolumeState::kApplying;
  }
  ChainDigest applied_chain;
  RETURN_IF_ERROR(AwaitAck(plan.id.seq, pb::EpochAck::APPLIED, &applied_chain));
  if (applied_chain != sent->chain) {
    return DataLoss(fmt::format("sink applied epoch {} with chain {}, source computed {}",
                                plan.id.seq, applied_chain.ToHex(), sent->chain.ToHex()));
  }
  times->applied = clock_->SecondsSince(t_applied);
  return sent;
}

void SourceReplicator::RecordPoint(const EpochStart& start, const EpochSummary& sum, double secs) {
  const uint64_t seq = start.plan.id.seq;
  sink_seq_ = seq;
  sink_chain_ = sum.chain;
  sink_point_time_ns_ = start.plan.id.snap_time_ns;
  point_snap_ = start.to;
  std::lock_guard lock(mu_);
  status_.state = VolumeState::kIdle;
  status_.last_seq = seq;
  status_.last_point_time_ns = start.to.time_ns;
  status_.bytes_total += sum.data_bytes;
  status_.epochs_total += 1;
  status_.throughput_bps = secs > 0 ? sum.data_bytes / secs : 0;
  status_.CountEpochSeconds(secs);
  status_.error.clear();
  if (start.plan.skip_records > 0) status_.resumed_epochs_total += 1;
  if (start.repair) {
    repair_ = false;
    status_.verify.repaired_seq = seq;
  }
  status_.pending_snapshots = static_cast<uint64_t>(std::count_if(
      start.ours.begin(), start.ours.end(), [&](const auto& kv) { return kv.first > seq; }));
}

void SourceReplicator::LogEpoch(const EpochStart& start, const EpochSummary& sum,
                                const EpochTimes& times, const Ahead& ahead) {
  const EpochPlan& plan = start.plan;
  spdlog::info(
      "volume {}: epoch {} applied at the sink: {} records{}, {} data bytes, {} zero bytes, "
      "{:.2f} s (snapshot and plan {:.2f} s, send {:.2f} s [waiting for reads {:.2f} s, "
      "for the link {:.2f} s], then durable {:.2f} s, applied {:.2f} s{}{})",
      config_.id, plan.id.seq, sum.records,
      plan.skip_records ? fmt::format(" (resumed at record {})", plan.skip_records) : "",
      sum.data_bytes, sum.zero_bytes, times.total, times.plan, times.send, times.send_detail.reads,
      times.send_detail.link, times.durable, times.applied,
      ahead.pruned
          ? fmt::format("; beside it, older snapshots removed in {:.2f} s", ahead.prune_secs)
          : "",
      ahead.took ? fmt::format("; next snapshot begun {:.2f} s after the send began, took {:.2f} s",
                               std::chrono::duration<double>(ahead.taken_at - times.begun).count(),
                               ahead.snap_secs)
                 : "");
}

StatusOr<EpochSummary> SourceReplicator::ShipEpoch(Volume& vol) {
  EpochTimes times;
  const auto t_plan = clock_->Now();
  ASSIGN_OR_RETURN(const EpochStart start, PlanEpoch(vol));
  const uint64_t seq = start.plan.id.seq;
  SendOptions opt;
  opt.block_size = config_.block_size;
  opt.window = config_.window;
  ASSIGN_OR_RETURN(const auto memory, BorrowReadWindow(start.to.size, &opt));
  // A resync compares block digests with the sink's point: only the blocks
  // that differ travel.
  std::unique_ptr<BaseDigests> digests;
  if (start.plan.resync && sink_serves_digests_) {
    digests = SinkDigests();
    opt.base = digests.get();
  }
  times.plan = clock_->SecondsSince(t_plan);
  times.begun = clock_->Now();
  // A snapshot of the primary, and a removal, go through the image's lock
  // owner (the guest), which first lets its writes in flight finish: under
  // load each takes 0.1-0.2 s, and a second or more on a busy primary. A
  // helper thread does both beside the epoch (TakeAhead): the older
  // snapshots go while it is sent, the next epoch's snapshot is taken while
  // the sink finishes, and ships as pending right after this one.
  // A group member takes no snapshot of its own: the group does.
  AheadThread ahead(*this, seq, start.to,
                    !member() && (start.ours.empty() || start.ours.rbegin()->first <= seq),
                    prune_deferred_ ? sink_seq_ : 0);
  ASSIGN_OR_RETURN(const EpochSummary sum, SendAndAwaitAcks(vol, start, opt, ahead, &times));
  // The point is made: said at once, not after the helper.
  times.total = clock_->SecondsSince(times.begun);
  RecordPoint(start, sum, times.total);
  if (group_.on_point) group_.on_point(seq);
  ahead.PointMade();
  const Ahead& took = ahead.result();
  if (took.took) {
    ahead_taken_at_ = took.taken_at;
    const std::string next = SnapName(seq + 1);
    if (std::any_of(took.snaps.begin(), took.snaps.end(),
                    [&](const SnapInfo& s) { return s.name == next; })) {
      ahead_snaps_ = took.snaps;
    }
    std::lock_guard lock(mu_);
    status_.pending_snapshots += 1;
  }
  LogEpoch(start, sum, times, took);
  // Snapshots older than this point go now, unless the next epoch is to
  // start right away: then its helper removes them beside its send.
  const bool next_now = took.took || [&] {
    if (next_due_at_ && clock_->Now() >= *next_due_at_) return true;
    std::lock_guard lock(mu_);
    return wanted_seq_ > seq;
  }();
  if (next_now) {
    prune_deferred_ = true;
  } else {
    PruneSnapshots(seq);
  }
  return sum;
}

bool SourceReplicator::PruneSnapshots(uint64_t applied) {
  // Through a volume of its own, closed right after: removing takes a
  // read-write handle, which the image kept for reading (vol_) must not hold.
  auto head = pool_->Open(config_.image);
  if (!head.ok()) {
    spdlog::warn("volume {}: cannot remove older snapshots: {}", config_.id,
                 head.status().ToString());
    return false;
  }
  Volume& vol = **head;
  auto snaps = vol.ListSnaps();
  if (!snaps.ok()) return true;
  // The older snapshots, as points at the times they were taken: the
  // newest keep_snapshots and those the tiers keep stay.
  std::vector<RestorePoint> older;
  for (auto& s : *snaps) {
    auto seq = ParseSnapName(s.name);
    if (seq && *seq < applied && *seq != pinned_seq_.load(std::memory_order_relaxed) &&
        *seq != verify_pin_.load(std::memory_order_relaxed)) {
      older.emplace_back().epoch.seq = *seq;
      older.back().epoch.snap_time_ns = s.time_ns;
    }
  }
  const std::set<uint64_t> keep =
      PointsToKeep(older, config_.keep_snapshots, config_.snapshot_tiers);
  for (const auto& p : older) {
    if (keep.contains(p.epoch.seq)) continue;
    Status st = vol.RemoveSnap(SnapName(p.epoch.seq));
    if (!st.ok())
      spdlog::warn("volume {}: cannot remove {}: {}", config_.id, SnapName(p.epoch.seq),
                   st.ToString());
  }
  return true;
}

void SourceReplicator::TakeAhead(uint64_t seq, const SnapInfo& to, bool may_take,
                                 uint64_t prune_base, std::optional<Clock::TimePoint> due_at,
                                 Ahead* out) {
  const auto ended = [&] {  // with mu_ held
    return stop_ || ahead_mode_ == AheadMode::kCancel;
  };
  if (prune_base > 0) {
    {
      std::lock_guard lock(mu_);
      if (ended()) return;
    }
    const auto t = clock_->Now();
    out->pruned = PruneSnapshots(prune_base);
    out->prune_secs = clock_->SecondsSince(t);
  }
  if (!may_take) return;
  {
    std::unique_lock lock(mu_);
    const auto due = [&] { return wanted_seq_ > seq || (due_at && clock_->Now() >= *due_at); };
    while (!ended() && ahead_mode_ != AheadMode::kEpochDone) {
      if (ahead_mode_ != AheadMode::kSending && due()) break;
      const bool timed = ahead_mode_ != AheadMode::kSending && due_at;
      clock_->WaitUntil(lock, cv_, timed ? *due_at : Clock::kForever);
    }
    if (ended() || !due()) return;
  }
  const bool asked = [&] {
    std::lock_guard lock(mu_);
    return wanted_seq_ > seq;
  }();
  auto head = pool_->Open(config_.image);
  if (!asked && head.ok()) {
    // Due by the schedule alone: nothing to take if nothing changed.
    auto changed = (*head)->ChangedSince(to);
    if (changed.ok() && !*changed) return;
  }
  out->taken_at = clock_->Now();
  const std::string next = SnapName(seq + 1);
  auto pass = SnapshotPass();
  if (!pass.ok()) return;  // the next epoch says why
  ReserveSnap(seq + 1);
  Status st = head.ok() ? (*head)->CreateSnap(next) : head.status();
  out->snap_secs = clock_->SecondsSince(out->taken_at);
  if (st.ok()) {
    out->took = true;
    // For the next epoch's plan (no listing there); it lists anew if not.
    if (auto listed = (*head)->ListSnaps(); listed.ok()) out->snaps = std::move(*listed);
  } else {
    spdlog::warn("volume {}: cannot take {} ahead: {}; the next epoch takes it", config_.id, next,
                 st.ToString());
  }
}

void SourceReplicator::TakeOutageSnapshot() {
  auto pass = SnapshotPass();
  if (!pass.ok()) {
    spdlog::warn("{}", pass.status().ToString());
    return;
  }
  auto vol = pool_->Open(config_.image);
  if (!vol.ok()) {
    spdlog::warn("volume {}: no snapshot while replication is down: {}", config_.id,
                 vol.status().ToString());
    return;
  }
  auto snaps = (*vol)->ListSnaps();
  if (!snaps.ok()) {
    spdlog::warn("volume {}: no snapshot while replication is down: {}", config_.id,
                 snaps.status().ToString());
    return;
  }
  uint64_t highest = sink_seq_;
  for (const auto& s : *snaps) highest = std::max(highest, ParseSnapName(s.name).value_or(0));
  const uint64_t seq = highest + 1;
  ReserveSnap(seq);
  if (Status st = (*vol)->CreateSnap(SnapName(seq)); !st.ok()) {
    spdlog::warn("volume {}: cannot take snapshot {} while replication is down: {}", config_.id,
                 SnapName(seq), st.ToString());
    return;
  }
  outage_snaps_.push_back(seq);
  uint64_t dropped = 0;
  while (outage_snaps_.size() > config_.outage_snapshots) {
    const uint64_t old = outage_snaps_.front();
    if (Status st = (*vol)->RemoveSnap(SnapName(old)); !st.ok() && st.code() != Code::kNotFound) {
      // Kept: it is shipped as an epoch of its own when the link returns.
      spdlog::warn("volume {}: cannot drop {}: {}", config_.id, SnapName(old), st.ToString());
    } else {
      ++dropped;
    }
    outage_snaps_.erase(outage_snaps_.begin());
  }
  uint64_t pending = 0;
  if (auto after = (*vol)->ListSnaps(); after.ok()) {
    for (const auto& s : *after) pending += ParseSnapName(s.name).value_or(0) > sink_seq_;
  }
  spdlog::debug("volume {}: sink unreachable: took {}, dropped {} older outage snapshot(s)",
                config_.id, SnapName(seq), dropped);
  std::lock_guard lock(mu_);  // highest_snap_ already holds seq (ReserveSnap)
  status_.pending_snapshots = pending;
}

void SourceReplicator::ReserveSnap(uint64_t seq) {
  std::lock_guard lock(mu_);
  highest_snap_ = std::max(highest_snap_, seq);
}

}  // namespace cairn
