// SourceReplicator: one epoch, from the handshake with the sink to the acks
// (ShipEpoch), and the snapshots it takes, keeps and prunes.

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <system_error>

#include "engine/base/thread_stack.h"
#include "engine/catalog/catalog.h"
#include "engine/replication/source.h"
#include "proto/cairn.pb.h"

namespace cairn {

StatusOr<SourceReplicator::SinkHello> SourceReplicator::Handshake(Link& link, bool probe) {
  pb::Hello hello;
  hello.set_protocol_version(kProtocolVersion);
  hello.set_volume(config_.id);
  hello.set_pool(config_.target_pool);
  hello.set_image(config_.target_image);
  hello.set_source_site(site_);
  hello.set_probe(probe);
  RETURN_IF_ERROR(link.Send(FrameType::kHello, hello.SerializeAsString(), {}));
  auto f = link.Receive(timeouts_.hello);
  if (!f.ok()) {
    // Whatever answers here is not a Cairn sink, or not one that works: its
    // bytes are no corruption of ours.
    const Code code = f.status().code();
    if (code == Code::kDataLoss) {
      return FailedPrecondition(fmt::format(
          "{} answered Hello with bytes that are not a Cairn frame ({}): is another service "
          "listening there? The peer must be a Cairn sink's [sink] listen address",
          link.peer(), f.status().message()));
    }
    if (code == Code::kAborted) {
      return Unavailable(
          fmt::format("{} closed the link without answering Hello ({}): is it a "
                      "Cairn sink?",
                      link.peer(), f.status().message()));
    }
    return f.status();
  }
  if (f->type == FrameType::kLinkError) return StatusFromLinkError(*f, "sink refused");
  pb::HelloReply reply;
  if (f->type != FrameType::kHelloReply || !reply.ParseFromString(f->body)) {
    return FailedPrecondition(
        fmt::format("{} did not answer Hello with HelloReply (got {}): is it a "
                    "Cairn sink?",
                    link.peer(), FrameTypeName(f->type)));
  }
  if (reply.protocol_version() != kProtocolVersion) {
    return FailedPrecondition(fmt::format("sink speaks protocol {}, this source {}: upgrade one",
                                          reply.protocol_version(), kProtocolVersion));
  }
  SinkHello out;
  if (!ChainDigest::FromString(reply.last_chain(), &out.last_chain)) {
    return DataLoss("HelloReply carries a malformed chain digest");
  }
  out.site = reply.sink_site();
  out.last_applied_seq = reply.last_applied_seq();
  out.resume_seq = reply.resume_seq();
  out.resume_records = reply.resume_records();
  out.takes_unchanged = reply.takes_unchanged();
  return out;
}

StatusOr<std::string> SourceReplicator::Probe() {
  ASSIGN_OR_RETURN(auto link, connect_());
  ASSIGN_OR_RETURN(const SinkHello reply, Handshake(*link, true));
  link->Close();
  return fmt::format("sink of site '{}' at {} takes volume '{}' into {}/{} (newest point {})",
                     reply.site, link->peer(), config_.id, config_.target_pool,
                     config_.target_image, reply.last_applied_seq);
}

Status SourceReplicator::Connect() {
  ASSIGN_OR_RETURN(auto link, connect_());
  ASSIGN_OR_RETURN(const SinkHello reply, Handshake(*link, false));
  sink_seq_ = reply.last_applied_seq;
  sink_chain_ = reply.last_chain;
  resume_seq_ = reply.resume_seq;
  resume_records_ = reply.resume_records;
  sink_takes_unchanged_ = reply.takes_unchanged;
  std::lock_guard lock(mu_);
  link_ = std::move(link);
  return OkStatus();
}

Status SourceReplicator::AwaitAck(uint64_t seq, int stage, ChainDigest* chain) {
  ASSIGN_OR_RETURN(Frame f, link_->Receive(timeouts_.ack));
  if (f.type == FrameType::kLinkError) return StatusFromLinkError(f, "sink");
  pb::EpochAck ack;
  if (f.type != FrameType::kEpochAck || !ack.ParseFromString(f.body)) {
    return DataLoss(fmt::format("expected EpochAck, got {}", FrameTypeName(f.type)));
  }
  if (ack.seq() != seq || ack.stage() != stage) {
    return DataLoss(fmt::format("ack for epoch {} stage {}, expected epoch {} stage {}", ack.seq(),
                                static_cast<int>(ack.stage()), seq, stage));
  }
  if (chain && !ChainDigest::FromString(ack.chain_digest(), chain)) {
    return DataLoss("EpochAck carries a malformed chain digest");
  }
  return OkStatus();
}

StatusOr<EpochSummary> SourceReplicator::ShipEpoch(Volume& vol) {
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  };
  const auto t_plan = Clock::now();
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
  std::map<uint64_t, SnapInfo> ours;
  for (auto& s : snaps) {
    if (auto seq = ParseSnapName(s.name)) ours[*seq] = s;
  }
  // The base of the next epoch is gone (the image was recreated, or its
  // snapshot removed by hand): the next epoch resends the whole image.
  const bool resync = sink_seq_ > 0 && !ours.count(sink_seq_);
  if (resync) {
    spdlog::warn(
        "volume {}: the sink's newest restore point is {} but image {}/{} has no "
        "snapshot {}: resyncing the whole image",
        config_.id, sink_seq_, config_.pool, config_.image, SnapName(sink_seq_));
  }
  // A snapshot taken but not yet applied at the sink is shipped first.
  auto pending = ours.upper_bound(sink_seq_);
  SnapInfo to;
  uint64_t seq;
  if (pending != ours.end()) {
    seq = pending->first;
    to = pending->second;
    // From now on the sink may hold a durable prefix of this epoch: the
    // snapshot must stay until it is applied.
    std::erase(outage_snaps_, seq);
  } else {
    seq = std::max(sink_seq_, ours.empty() ? 0 : ours.rbegin()->first) + 1;
    ReserveSnap(seq);
    // The next snapshot is due an interval after this one is begun (not
    // after the connect and the plan that came before it).
    if (next_due_at_) next_due_at_ = Clock::now() + config_.interval;
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
    to = *it;
  }
  {
    std::lock_guard lock(mu_);
    highest_snap_ =
        std::max(highest_snap_, ours.empty() ? seq : std::max(seq, ours.rbegin()->first));
    snaps_known_ = true;
    status_.state = VolumeState::kSyncing;
  }

  EpochPlan plan;
  plan.volume = config_.id;
  plan.seq = seq;
  plan.base_seq = sink_seq_;
  plan.from_snap = sink_seq_ && !resync ? SnapName(sink_seq_) : "";
  plan.resync = resync;
  plan.to_snap = to.name;
  plan.to_snap_id = to.id;
  if (!plan.from_snap.empty()) plan.from_snap_id = ours.at(sink_seq_).id;
  plan.image_size = to.size;
  plan.snap_time_ns = to.time_ns;
  plan.prev_chain = sink_chain_;
  plan.source_site = site_;
  // After a cut the sink keeps what it verified and made durable: send the
  // rest only. (The same snapshots and options rebuild the same records; if
  // they did not, the sink's verifier refuses and the epoch starts over.)
  if (resume_seq_ == seq) plan.skip_records = resume_records_;
  resume_seq_ = resume_records_ = 0;
  EpochOptions opt;
  opt.block_size = config_.block_size;
  opt.window = config_.window;
  // The read window comes out of the daemon's memory budget: at least one
  // block, as much of the configured window as is free, and never more
  // than the image holds (a small volume leaves the rest to the others).
  std::optional<MemoryBudget::Lease> memory;
  if (budget_) {
    const uint64_t blocks = std::max<uint64_t>(1, (to.size + opt.block_size - 1) / opt.block_size);
    const uint64_t want = std::min<uint64_t>(opt.window, blocks) * opt.block_size;
    memory = budget_->Acquire(want, opt.block_size, [this] {
      std::lock_guard lock(mu_);
      return stop_;
    });
    if (!memory) return Aborted("stopping");
    opt.window = static_cast<uint32_t>(std::max<uint64_t>(1, memory->bytes() / opt.block_size));
  }

  const double snap_secs = seconds_since(t_plan);
  const auto t0 = Clock::now();
  // A snapshot of the primary, and a removal, go through the image's lock
  // owner (the guest), which first lets its writes in flight finish: under
  // load each takes 0.1-0.2 s, and a second or more on a busy primary. A
  // helper thread does both beside the epoch (TakeAhead): the older
  // snapshots go while it is sent, the next epoch's snapshot is taken while
  // the sink finishes, and ships as pending right after this one.
  Ahead ahead;
  const bool may_take = ours.empty() || ours.rbegin()->first <= seq;
  const uint64_t prune_base = prune_deferred_ ? sink_seq_ : 0;
  {
    std::lock_guard lock(mu_);
    ahead_mode_ = AheadMode::kSending;
  }
  std::thread helper;
  try {
    helper = std::thread([this, seq, to, may_take, prune_base, due = next_due_at_, &ahead] {
      TakeAhead(seq, to, may_take, prune_base, due, &ahead);
    });
  } catch (const std::system_error& e) {
    // No thread to be had: the epoch goes on, the next one takes its own
    // snapshot and the removals wait.
    spdlog::warn("volume {}: no helper thread beside epoch {}: {}", config_.id, seq, e.what());
  }
  const auto end_helper = [&](AheadMode how) {
    if (!helper.joinable()) return;
    {
      std::lock_guard lock(mu_);
      ahead_mode_ = how;
    }
    cv_.notify_all();
    helper.join();
    if (ahead.pruned) prune_deferred_ = false;
  };
  // Every way out of here ends the helper; one that failed begins nothing
  // more. A snapshot it took ahead before the failure counts among the
  // outage snapshots from then on: bounded by outage_snapshots like them.
  struct HelperGuard {
    const decltype(end_helper)& end;
    const Ahead& ahead;
    std::vector<uint64_t>& outage_snaps;
    uint64_t next_seq;
    bool point_made = false;
    ~HelperGuard() {
      end(AheadMode::kCancel);
      if (!point_made && ahead.took &&
          std::find(outage_snaps.begin(), outage_snaps.end(), next_seq) == outage_snaps.end()) {
        outage_snaps.push_back(next_seq);
      }
    }
  } guard{end_helper, ahead, outage_snaps_, seq + 1};

  SendTimes send_times;
  WatchedWriter wire(*link_);
  auto sent = SendEpoch(vol, plan, opt, wire, &send_times);
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
  EpochSummary sum = std::move(sent).value();
  const double send_secs = seconds_since(t0);
  // The next epoch reads another snapshot: this one's handle is closed
  // while the sink finishes, not kept open for the interval.
  vol.CloseSnapshotHandles();
  {
    std::lock_guard lock(mu_);
    ahead_mode_ = AheadMode::kSent;
  }
  cv_.notify_all();
  const auto t_durable = Clock::now();
  RETURN_IF_ERROR(AwaitAck(seq, pb::EpochAck::DURABLE, nullptr));
  const double durable_secs = seconds_since(t_durable);
  const auto t_applied = Clock::now();
  {
    std::lock_guard lock(mu_);
    status_.state = VolumeState::kApplying;
  }
  ChainDigest applied_chain;
  RETURN_IF_ERROR(AwaitAck(seq, pb::EpochAck::APPLIED, &applied_chain));
  if (applied_chain != sum.chain) {
    return DataLoss(fmt::format("sink applied epoch {} with chain {}, source computed {}", seq,
                                applied_chain.ToHex(), sum.chain.ToHex()));
  }
  const double applied_secs = seconds_since(t_applied);
  const double secs = seconds_since(t0);
  sink_seq_ = seq;
  sink_chain_ = sum.chain;
  point_snap_ = to;
  {
    // The point is made: said at once, not after the helper.
    std::lock_guard lock(mu_);
    status_.state = VolumeState::kIdle;
    status_.last_seq = seq;
    status_.last_point_time_ns = to.time_ns;
    status_.bytes_total += sum.data_bytes;
    status_.epochs_total += 1;
    status_.throughput_bps = secs > 0 ? sum.data_bytes / secs : 0;
    status_.error.clear();
    if (plan.skip_records > 0) status_.resumed_epochs_total += 1;
    status_.pending_snapshots = static_cast<uint64_t>(
        std::count_if(ours.begin(), ours.end(), [&](const auto& kv) { return kv.first > seq; }));
  }
  // The helper still takes the next snapshot if it is due by now;
  // otherwise the next epoch takes it when the schedule says.
  end_helper(AheadMode::kEpochDone);
  guard.point_made = true;
  const bool took_next = ahead.took;
  if (took_next) {
    ahead_taken_at_ = ahead.taken_at;
    const std::string next = SnapName(seq + 1);
    if (std::any_of(ahead.snaps.begin(), ahead.snaps.end(),
                    [&](const SnapInfo& s) { return s.name == next; })) {
      ahead_snaps_ = std::move(ahead.snaps);
    }
    std::lock_guard lock(mu_);
    status_.pending_snapshots += 1;
  }
  spdlog::info(
      "volume {}: epoch {} applied at the sink: {} records{}, {} data bytes, {} zero bytes, "
      "{:.2f} s (snapshot and plan {:.2f} s, send {:.2f} s [waiting for reads {:.2f} s, "
      "for the link {:.2f} s], then durable {:.2f} s, applied {:.2f} s{}{})",
      config_.id, seq, sum.records,
      plan.skip_records ? fmt::format(" (resumed at record {})", plan.skip_records) : "",
      sum.data_bytes, sum.zero_bytes, secs, snap_secs, send_secs, send_times.reads, send_times.link,
      durable_secs, applied_secs,
      ahead.pruned
          ? fmt::format("; beside it, older snapshots removed in {:.2f} s", ahead.prune_secs)
          : "",
      took_next
          ? fmt::format("; next snapshot begun {:.2f} s after the send began, took {:.2f} s",
                        std::chrono::duration<double>(ahead.taken_at - t0).count(), ahead.snap_secs)
          : "");
  // Snapshots older than this point go now, unless the next epoch is to
  // start right away: then its helper removes them beside its send.
  const bool next_now = took_next || [&] {
    if (next_due_at_ && Clock::now() >= *next_due_at_) return true;
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
  std::vector<uint64_t> older;
  for (auto& s : *snaps) {
    auto seq = ParseSnapName(s.name);
    if (seq && *seq < applied) older.push_back(*seq);
  }
  std::sort(older.begin(), older.end());
  const size_t drop =
      older.size() > config_.keep_snapshots ? older.size() - config_.keep_snapshots : 0;
  for (size_t i = 0; i < drop; ++i) {
    Status st = vol.RemoveSnap(SnapName(older[i]));
    if (!st.ok())
      spdlog::warn("volume {}: cannot remove {}: {}", config_.id, SnapName(older[i]),
                   st.ToString());
  }
  return true;
}

void SourceReplicator::TakeAhead(uint64_t seq, const SnapInfo& to, bool may_take,
                                 uint64_t prune_base, std::optional<Clock::time_point> due_at,
                                 Ahead* out) {
  const auto ended = [&] {  // with mu_ held
    return stop_ || ahead_mode_ == AheadMode::kCancel;
  };
  if (prune_base > 0) {
    {
      std::lock_guard lock(mu_);
      if (ended()) return;
    }
    const auto t = Clock::now();
    out->pruned = PruneSnapshots(prune_base);
    out->prune_secs = std::chrono::duration<double>(Clock::now() - t).count();
  }
  if (!may_take) return;
  {
    std::unique_lock lock(mu_);
    const auto due = [&] { return wanted_seq_ > seq || (due_at && Clock::now() >= *due_at); };
    while (!ended() && ahead_mode_ != AheadMode::kEpochDone) {
      if (ahead_mode_ == AheadMode::kSending) {
        cv_.wait(lock);
      } else if (due()) {
        break;
      } else if (due_at) {
        cv_.wait_until(lock, *due_at);
      } else {
        cv_.wait(lock);
      }
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
  out->taken_at = Clock::now();
  const std::string next = SnapName(seq + 1);
  ReserveSnap(seq + 1);
  Status st = head.ok() ? (*head)->CreateSnap(next) : head.status();
  out->snap_secs = std::chrono::duration<double>(Clock::now() - out->taken_at).count();
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
