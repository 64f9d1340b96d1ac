#include "engine/replication/source.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <system_error>

#include "engine/base/thread_stack.h"
#include "engine/catalog/catalog.h"
#include "proto/cairn.pb.h"

namespace cairn {

std::string_view StateName(VolumeState state) {
  switch (state) {
    case VolumeState::kIdle:
      return "idle";
    case VolumeState::kSyncing:
      return "syncing";
    case VolumeState::kReceiving:
      return "receiving";
    case VolumeState::kApplying:
      return "applying";
    case VolumeState::kDisconnected:
      return "disconnected";
    case VolumeState::kError:
      return "error";
  }
  return "unknown";
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

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
  }
  cv_.notify_all();
  if (budget_) budget_->Wake();  // an epoch waiting for memory gives up
}

void SourceReplicator::Stop() {
  RequestStop();
  if (thread_.joinable()) {
    thread_.join();
    // As with the link: a later Start opens the image and lists anew.
    vol_.reset();
    ahead_snaps_.reset();
  }
}

StatusOr<uint64_t> SourceReplicator::RequestNow() {
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
  if (s.last_point_time_ns > 0) {
    s.lag_seconds = (NowNs() - std::max(s.last_point_time_ns, unchanged_at_ns_)) / 1e9;
  }
  return s;
}

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

StatusOr<EpochSummary> SourceReplicator::RunOnce() {
  if (!link_) {
    Status st = Connect();
    if (!st.ok()) return st.Annotate(fmt::format("connecting to sink {}", status_.peer));
    std::lock_guard lock(mu_);
    if (sink_seq_ > status_.last_seq) status_.last_seq = sink_seq_;
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
  const int64_t asked_at = NowNs();  // what was written before is seen
  auto changed = vol_->ChangedSince(point_snap_);
  if (!changed.ok()) {
    spdlog::debug("volume {}: cannot tell whether {} changed since {}: {}", config_.id,
                  config_.image, point_snap_.name, changed.status().ToString());
    return false;
  }
  if (*changed) return false;
  {
    std::lock_guard lock(mu_);
    unchanged_at_ns_ = asked_at;
    ++status_.unchanged_checks_total;
  }
  if (link_ && sink_takes_unchanged_) {
    // The standby hears it too: its lag for this volume counts from now.
    pb::Unchanged u;
    u.set_seq(sink_seq_);
    u.set_as_of_ns(asked_at);
    if (Status st = link_->Send(FrameType::kUnchanged, u.SerializeAsString(), {}); !st.ok()) {
      spdlog::debug("volume {}: could not tell the sink the image is unchanged: {}", config_.id,
                    st.ToString());
      Disconnect();  // the next epoch connects afresh
    }
  }
  return true;
}

void SourceReplicator::Loop() {
  using Clock = std::chrono::steady_clock;
  const bool periodic = config_.interval.count() > 0;
  auto next = Clock::now();      // the next periodic epoch (or outage snapshot)
  auto retry_at = Clock::now();  // no attempt before this (backoff)
  auto backoff = std::chrono::milliseconds(500);
  bool outage = false;                           // the last attempt failed
  std::optional<Clock::time_point> carried_due;  // see ahead_taken_at_
  std::string last_error;
  {
    // The sink's newest point is known (and shown) from the start, also
    // for a volume replicated on demand only.
    Status st = Connect();
    std::lock_guard lock(mu_);
    if (st.ok()) {
      status_.last_seq = std::max(status_.last_seq, sink_seq_);
      status_.state = VolumeState::kIdle;
    } else if (!stop_) {
      last_error = st.Annotate(fmt::format("connecting to sink {}", status_.peer)).ToString();
      status_.error = last_error;
      status_.state = VolumeState::kDisconnected;
      spdlog::warn("volume {}: {}", config_.id, last_error);
    }
  }
  std::unique_lock lock(mu_);
  while (!stop_) {
    const auto now = Clock::now();
    if (outage && periodic && now >= next && now < retry_at) {
      // The schedule goes on while the sink is unreachable.
      lock.unlock();
      TakeOutageSnapshot();
      lock.lock();
      next = Clock::now() + config_.interval;
      continue;
    }
    const bool due = wanted_seq_ > status_.last_seq || (periodic && now >= next);
    if (now < retry_at || !due) {
      auto wake = Clock::time_point::max();
      if (now < retry_at) {
        wake = due || !periodic ? retry_at : std::max(next, retry_at);
        if (outage && periodic) wake = std::min(wake, next);
      } else if (periodic) {
        wake = next;
      }
      // Most of a volume's life is this wait: its deep stack goes back.
      ReleaseStackBelowHere();
      if (wake == Clock::time_point::max()) {
        cv_.wait(lock);
      } else {
        cv_.wait_until(lock, wake);
      }
      continue;
    }
    if (!outage && wanted_seq_ <= status_.last_seq) {
      // Due by the schedule alone: an image that did not change since the
      // newest point costs no snapshot, no epoch, no point.
      lock.unlock();
      const bool unchanged = UnchangedSincePoint();
      lock.lock();
      if (unchanged) {
        // The next check of an idle volume falls on a whole tick (a tenth
        // of the interval, at most a second), with those of the other idle
        // volumes due in it: their RADOS ops then go out together, and the
        // client's messenger wakes once for many.
        const auto tick = std::max<Clock::duration>(
            std::min<Clock::duration>(std::chrono::seconds(1), config_.interval / 10),
            std::chrono::milliseconds(1));
        const auto due = (Clock::now() + config_.interval).time_since_epoch();
        next = Clock::time_point((due + tick - Clock::duration(1)) / tick * tick);
        carried_due.reset();
        continue;
      }
    }
    lock.unlock();
    const auto started = Clock::now();
    // The next snapshot is due an interval after this epoch's: taken at its
    // start, or by the helper of the epoch before (then counted from then).
    next_due_at_ =
        periodic ? std::optional(carried_due.value_or(started + config_.interval)) : std::nullopt;
    carried_due.reset();
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
      backoff = std::chrono::milliseconds(500);
      last_error.clear();
      outage = false;
      if (ahead_taken_at_ && periodic) {
        // The next epoch's snapshot exists: ship it now.
        carried_due = *ahead_taken_at_ + config_.interval;
        next = Clock::now();
      } else {
        next = snap_due;
      }
      retry_at = Clock::now();
      continue;
    }
    if (stop_) break;  // the epoch was cut by Stop(): nothing went wrong
    const std::string msg = r.status().ToString();
    status_.error = msg;
    status_.errors_total++;
    const Code code = r.status().code();
    status_.state = code == Code::kUnavailable || code == Code::kAborted
                        ? VolumeState::kDisconnected
                        : VolumeState::kError;
    if (msg != last_error) spdlog::error("volume {}: {}", config_.id, msg);
    last_error = msg;
    outage = true;
    retry_at = Clock::now() + backoff;
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30'000));
  }
}

}  // namespace cairn
