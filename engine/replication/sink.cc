// Sink: sessions with sources, and receiving epochs into the spool and the
// standby image (sink.h says what the sink is).

#include "engine/replication/sink.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cassert>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <ctime>
#include <future>
#include <system_error>

#include "engine/base/thread_stack.h"
#include "engine/link/codec_link.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {

void WarnAppliedFromSpool(const std::string& volume, uint64_t seq, const Status& why) {
  spdlog::warn("volume {}: epoch {} is applied from the spool: {}", volume, seq, why.message());
}

namespace {

void SendError(Link& link, const Status& st) { (void)WriteLinkError(link, st); }

}  // namespace

namespace {

Status SendAck(Link& link, uint64_t seq, pb::EpochAck::Stage stage, const ChainDigest& chain) {
  pb::EpochAck ack;
  ack.set_seq(seq);
  ack.set_stage(stage);
  ack.set_chain_digest(chain.AsBytes());
  return link.Send(FrameType::kEpochAck, ack.SerializeAsString(), {});
}

}  // namespace

Sink::Sink(SinkEnv env) : env_(std::move(env)) {
  assert(env_.spools != nullptr && "SinkEnv::spools is required");
  retrier_ = std::thread([this] { RetryLoop(); });
}

Sink::~Sink() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  retry_cv_.notify_all();
  if (env_.budget) env_.budget->Wake();
  if (retrier_.joinable()) retrier_.join();
}

Status Sink::ClusterError(Target& t, const Status& st, std::string_view what) {
  if (st.ok()) return st;
  t.sink_fault = true;
  if (st.code() != Code::kUnavailable) return st.Annotate(what);
  return Unavailable(fmt::format("the standby Ceph cluster of site {}{} is unreachable: {}: {}",
                                 env_.site, env_.cluster.empty() ? "" : " (" + env_.cluster + ")",
                                 what, st.message()));
}

void Sink::SetState(const std::string& volume, const std::function<void(VolumeStatusInfo&)>& fn) {
  std::lock_guard lock(mu_);
  VolumeStatusInfo& s = status_[volume];
  s.volume = volume;
  s.role = "sink";
  fn(s);
}

std::vector<VolumeStatusInfo> Sink::Report() const {
  std::lock_guard lock(mu_);
  std::vector<VolumeStatusInfo> out;
  for (const auto& [v, s] : status_) {
    VolumeStatusInfo c = s;
    // The point holds the image as of its snapshot, or as of the source's
    // last word that nothing changed since.
    const int64_t held_at = std::max(c.last_point_time_ns, c.unchanged_as_of_ns);
    if (c.last_point_time_ns > 0) c.lag_seconds = (env_.clock->UnixNs() - held_at) / 1e9;
    out.push_back(c);
  }
  return out;
}

uint64_t Sink::corrupt_frames() const {
  std::lock_guard lock(mu_);
  return corrupt_frames_;
}

namespace {

// Who a session's peer is: the first name of its certificate ("" on a
// link without TLS).
std::string PeerIdentity(const Link& link) {
  return link.peer_names().empty() ? std::string() : link.peer_names().front();
}

}  // namespace

StatusOr<pb::Hello> Sink::ReceiveHello(Link& link) {
  auto first = link.Receive(env_.timeouts.hello);
  if (!first.ok()) {
    const Code code = first.status().code();
    if (code == Code::kDataLoss) {
      std::lock_guard lock(mu_);
      ++corrupt_frames_;  // of no known volume yet
    }
    // Not a Cairn peer, or one of another version: tell it why, in case it
    // can read our frames.
    if (code == Code::kDataLoss || code == Code::kFailedPrecondition) {
      SendError(link, first.status());
    }
    return first.status();
  }
  const Frame& f = *first;
  pb::Hello hello;
  Status st;
  if (f.type != FrameType::kHello || !hello.ParseFromString(f.body)) {
    st = FailedPrecondition(
        fmt::format("expected Hello from {}, got a {} frame: is it a Cairn source?", link.peer(),
                    FrameTypeName(f.type)));
  } else if (hello.protocol_version() != kProtocolVersion) {
    st = FailedPrecondition(
        fmt::format("source {} speaks protocol {}, this sink speaks {}: upgrade the older side",
                    link.peer(), hello.protocol_version(), kProtocolVersion));
  }
  if (!st.ok()) {
    SendError(link, st);
    return st;
  }
  return hello;
}

Status Sink::OpenTarget(Target& t) {
  RETURN_IF_ERROR(ValidateVolumeId(t.volume));
  if (t.image.empty()) return InvalidArgument("Hello names no target image");
  if (std::find(env_.pools.begin(), env_.pools.end(), t.pool_name) == env_.pools.end()) {
    return FailedPrecondition(
        fmt::format("pool '{}' is not served by this sink: add it to [sink] pools", t.pool_name));
  }
  ASSIGN_OR_RETURN(t.pool, env_.open_pool(t.pool_name));
  ASSIGN_OR_RETURN(t.kv, env_.open_catalog(t.pool_name));
  t.catalog = std::make_unique<Catalog>(*t.kv);
  ASSIGN_OR_RETURN(const auto promoted, t.catalog->GetPromotion(t.volume));
  if (promoted) {
    return FailedPrecondition(fmt::format(
        "volume '{}' is failed over to site {}: restore point {} was promoted into {}/{}; "
        "release it (failback) before it replicates again",
        t.volume, env_.site, promoted->seq, promoted->pool, promoted->image));
  }
  return env_.spools->AddVolume(t.volume);
}

Status Sink::AnswerProbe(Link& link, const Target& t) {
  pb::HelloReply reply;
  reply.set_protocol_version(kProtocolVersion);
  reply.set_last_applied_seq(t.last_seq);
  reply.set_last_chain(t.chain.AsBytes());
  reply.set_sink_site(env_.site);
  spdlog::info("volume {}: {} checked this sink (cairnd --check): it would be taken", t.volume,
               link.peer());
  return link.Send(FrameType::kHelloReply, reply.SerializeAsString(), {});
}

Status Sink::ClaimVolume(Link& link, const Target& t) {
  std::unique_lock lock(mu_);
  const auto now = env_.clock->Now();
  // The standby cluster failed a moment ago with an epoch durable in the
  // spool: the sink retries by itself; say so at once rather than make the
  // source wait for another op timeout.
  if (auto p = pending_.find(t.volume);
      p != pending_.end() && !active_.count(t.volume) && p->second.next > now) {
    spdlog::debug("refusing source {} for volume '{}': {}", link.peer(), t.volume,
                  p->second.error.message());
    return p->second.error;
  }
  if (auto r = spool_refusals_.find(t.volume);
      r != spool_refusals_.end() && !active_.count(t.volume) && r->second.until > now &&
      (r->second.error.reason() != Reason::kSpoolDiskFull ||
       env_.spools->FreeBytes() < r->second.free_bytes + (4u << 20))) {
    spdlog::debug("refusing source {} for volume '{}': {}", link.peer(), t.volume,
                  r->second.error.message());
    return r->second.error;
  }
  // A source that reconnects after a cut replaces its old session, which
  // may not have noticed the cut yet (a half-open TCP connection).
  if (auto it = active_.find(t.volume); it != active_.end()) {
    if (it->second != nullptr && PeerIdentity(*it->second) != PeerIdentity(link)) {
      return PermissionDenied(
          fmt::format("volume '{}' is replicated here by {}; a session of {} may not replace it",
                      t.volume, PeerIdentity(*it->second), PeerIdentity(link)));
    }
    if (it->second != nullptr) {
      spdlog::warn("volume {}: new connection from {} replaces the session of {}", t.volume,
                   link.peer(), it->second->peer());
      it->second->Close();
    } else {
      spdlog::info(
          "volume {}: connection from {} waits for the sink's own apply of a spooled epoch",
          t.volume, link.peer());
    }
  }
  const std::string image = t.pool_name + "/" + t.image;
  for (const auto& [vol, other] : active_images_) {
    if (vol != t.volume && other == image) {
      return FailedPrecondition(
          fmt::format("image {} is already the target of volume '{}': give '{}' another "
                      "target_image",
                      image, vol, t.volume));
    }
  }
  if (!env_.clock->WaitUntil(lock, released_, now + std::chrono::seconds(30),
                             [&] { return !active_.count(t.volume); })) {
    return Unavailable(
        active_[t.volume] == nullptr
            ? fmt::format("volume '{}': the sink is still applying a spooled epoch to the standby "
                          "cluster after 30 s; try again",
                          t.volume)
            : fmt::format("volume '{}': the previous session did not end within 30 s; try again",
                          t.volume));
  }
  active_[t.volume] = &link;
  active_images_[t.volume] = image;
  return OkStatus();
}

Status Sink::ReleaseVolumeLocked(const Target& t, Status st) {
  active_.erase(t.volume);
  active_images_.erase(t.volume);
  VolumeStatusInfo& s = status_[t.volume];
  if (st.code() == Code::kDataLoss) {  // a frame failed verification
    ++corrupt_frames_;
    ++s.corrupt_frames_total;
  }
  // A replaced session leaves the status to the session that replaced it.
  if (active_.count(t.volume)) return st;
  s.state = t.sink_fault || t.source_fault ? VolumeState::kError : VolumeState::kDisconnected;
  if (!st.ok() && st.code() != Code::kAborted) {
    s.error = st.ToString();
    ++s.errors_total;
  }
  if (t.recovered && t.durable_seq == 0) {
    pending_.erase(t.volume);  // nothing durable is left unapplied
  } else if (!st.ok() && (t.durable_seq != 0 || pending_.count(t.volume))) {
    st = ScheduleRetryLocked(t.volume, t, st);
  }
  if (t.spool_refused != Reason::kNone) {
    SpoolRefusal& r = spool_refusals_[t.volume];
    r.error = st.WithReason(t.spool_refused);
    r.free_bytes = env_.spools->FreeBytes();
    r.until = env_.clock->Now() + std::chrono::seconds(60);
  } else if (t.recovered) {
    spool_refusals_.erase(t.volume);
  }
  return st;
}

namespace {

// The volume's own retention rules in `hello`, else `sink_rules` (the
// sink keeps what either keeps: Sink::KeptByRules).
StatusOr<RetentionRules> RulesOf(const pb::Hello& hello, const RetentionRules& sink_rules) {
  if (!hello.has_retention()) return sink_rules;
  auto tiers = ParseRetentionTiers(hello.retention().tiers());
  if (!tiers.ok()) return tiers.status().Annotate("the source's retention rules");
  RetentionRules rules{hello.retention().keep_points(), std::move(tiers).value()};
  spdlog::debug("volume {}: retention by its source's rules: {}", hello.volume(),
                DescribeRetention(rules));
  return rules;
}

}  // namespace

Status Sink::Serve(Link& link) {
  ASSIGN_OR_RETURN(const pb::Hello hello, ReceiveHello(link));
  Target t;
  t.volume = hello.volume();
  t.pool_name = hello.pool();
  t.image = hello.image();
  t.source_site = hello.source_site();
  auto refuse = [&](const Status& st) {
    spdlog::error("refusing source {} for volume '{}': {}", link.peer(), t.volume, st.message());
    // A valid volume id: its status shows the refusal.
    if (ValidateVolumeId(t.volume).ok() && !hello.probe()) {
      SetState(t.volume, [&](VolumeStatusInfo& s) {
        s.state = VolumeState::kError;
        s.error = "refused the source " + link.peer() + ": " + st.ToString();
        ++s.errors_total;
        if (s.pool.empty()) s.pool = t.pool_name;
        if (s.image.empty()) s.image = t.image;
      });
    }
    SendError(link, st);
    return st;
  };
  // Before any state of the volume is read: may this peer write it?
  if (Status st =
          AuthorizeSource(env_.grants, link.peer_names(), t.source_site, t.pool_name, t.volume);
      !st.ok()) {
    spdlog::warn("refusing source {} for volume '{}': {}", link.peer(), t.volume, st.message());
    SendError(link, st);
    return st;
  }
  auto rules = RulesOf(hello, SinkRules());
  if (!rules.ok()) return refuse(rules.status());
  t.rules = std::move(rules).value();
  if (Status st = OpenTarget(t); !st.ok()) return refuse(st);
  if (hello.verify_seq() != 0) {
    Status st = ServeVerify(link, t, hello.verify_seq());
    if (!st.ok()) {
      spdlog::error("volume {}: verify of restore point {} for {} failed: {}", t.volume,
                    hello.verify_seq(), link.peer(), st.ToString());
      SendError(link, st);
    }
    return st;
  }
  if (hello.probe()) {
    if (Status st = CheckProbe(t); !st.ok()) return refuse(st);
    return AnswerProbe(link, t);
  }
  if (Status st = ClaimVolume(link, t); !st.ok()) {
    SendError(link, st);
    return st;
  }
  if (hello.hand_back_seq() != 0) {
    Status st = HandBack(link, t, hello);
    EndHandBack(t, st.ok());
    if (!st.ok()) return refuse(st);
    return OkStatus();
  }
  Status st = hello.has_base_point() ? AdoptBase(t, hello) : OkStatus();
  if (st.ok()) {
    st = Session(link, t);
  } else {
    spdlog::error("refusing source {} for volume '{}': {}", link.peer(), t.volume, st.message());
    t.source_fault = true;                         // waits for an operator: an error, not a cut
    SetState(t.volume, [&](VolumeStatusInfo& s) {  // its status shows why
      s.pool = t.pool_name;
      s.image = t.image;
    });
  }
  {
    std::lock_guard lock(mu_);
    st = ReleaseVolumeLocked(t, st);
  }
  released_.notify_all();
  retry_cv_.notify_all();
  if (!st.ok() && st.code() != Code::kAborted) SendError(link, st);
  return st.code() == Code::kAborted ? OkStatus() : st;
}

void Sink::EndHandBack(const Target& t, bool handed) {
  {
    std::lock_guard lock(mu_);
    active_.erase(t.volume);
    active_images_.erase(t.volume);
    if (handed) status_.erase(t.volume);  // no longer this sink's
  }
  released_.notify_all();
}

StatusOr<bool> Sink::HasResyncBase(const Target& t) {
  if (t.last_seq > 0) return false;
  auto vol = t.pool->Open(t.image);
  if (vol.status().code() == Code::kNotFound) return false;
  RETURN_IF_ERROR(vol.status());
  ASSIGN_OR_RETURN(const auto snaps, (*vol)->ListSnaps());
  if (!ResyncBaseOf(snaps)) return false;
  ASSIGN_OR_RETURN(const std::string owner, ImageOwnerFor(t));
  return owner == t.volume;
}

Status Sink::CheckProbe(Target& t) {
  RETURN_IF_ERROR(LoadLatest(t).status());
  ASSIGN_OR_RETURN(std::string owner, ImageOwnerFor(t));
  ASSIGN_OR_RETURN(bool exists, t.pool->Exists(t.image));
  if (exists && owner.empty()) {
    return FailedPrecondition(
        fmt::format("image {}/{} exists at this site but was not created by Cairn for volume '{}': "
                    "remove or rename it, or set another target_image",
                    t.pool_name, t.image, t.volume));
  }
  return env_.spools->CheckWritable(t.volume);
}

StatusOr<std::optional<RestorePoint>> Sink::LoadLatest(Target& t) {
  auto latest = t.catalog->Latest(t.volume);
  if (!latest.ok()) return ClusterError(t, latest.status(), "reading the catalog");
  if (*latest) {
    t.last_seq = (*latest)->epoch.seq;
    t.chain = (*latest)->chain_digest;
    // Two primaries for one volume would interleave two histories.
    const std::string& from = (*latest)->epoch.source_site;
    if (!from.empty() && !t.source_site.empty() && from != t.source_site) {
      return FailedPrecondition(fmt::format(
          "volume '{}' is replicated from site '{}'; refusing a second source at site '{}'",
          t.volume, from, t.source_site));
    }
  }
  return latest;
}

Status Sink::Session(Link& link, Target& t) {
  ASSIGN_OR_RETURN(std::optional<RestorePoint> latest, LoadLatest(t));
  ASSIGN_OR_RETURN(const bool forgot, ForgetLostPoints(t));
  if (forgot) {
    ASSIGN_OR_RETURN(latest, LoadLatest(t));
  }
  RETURN_IF_ERROR(RecoverSpool(t));
  t.recovered = true;
  if (t.last_seq != (latest ? latest->epoch.seq : 0)) {  // a spooled epoch became a point
    ASSIGN_OR_RETURN(latest, LoadLatest(t));
  }
  SetState(t.volume, [&](VolumeStatusInfo& s) {
    s.state = VolumeState::kIdle;
    s.pool = t.pool_name;
    s.image = t.image;
    s.peer = link.peer();
    s.last_seq = t.last_seq;
    if (latest) s.last_point_time_ns = latest->epoch.snap_time_ns;
    if (t.last_point_time_ns > 0) s.last_point_time_ns = t.last_point_time_ns;
    // The last error stays until a point is made: a source that fails each
    // epoch (its image gone) reconnects, and must not wipe out why.
  });
  pb::HelloReply reply;
  reply.set_protocol_version(kProtocolVersion);
  reply.set_last_applied_seq(t.last_seq);
  reply.set_last_chain(t.chain.AsBytes());
  reply.set_sink_site(env_.site);
  reply.set_takes_unchanged(true);
  reply.set_serves_digests(true);
  reply.set_serves_verify(true);
  reply.set_takes_compressed(true);
  ASSIGN_OR_RETURN(t.resync_base, HasResyncBase(t));
  reply.set_resync_base(t.resync_base);
  if (latest) reply.set_last_point_time_ns(latest->epoch.snap_time_ns);
  if (t.partial.records > 0) {
    reply.set_resume_seq(t.partial.seq);
    reply.set_resume_records(t.partial.records);
  }
  RETURN_IF_ERROR(link.Send(FrameType::kHelloReply, reply.SerializeAsString(), {}));
  spdlog::info("volume {}: source {} connected; newest restore point {}", t.volume, link.peer(),
               t.last_seq);
  return ServeEpochs(link, t);
}

Status Sink::ServeEpochs(Link& wire, Target& t) {
  // Records may come compressed (codec_link.h): decoded here, so that the
  // verifier, the spool and the apply see each as the source read it.
  CodecLink link(wire, Compression::kNone);
  while (true) {
    // Most of a session's life is this wait: its deep stack goes back.
    ReleaseStackBelowHere();
    auto f = link.Receive(env_.timeouts.idle);
    if (!f.ok()) return f.status();
    if (f->type == FrameType::kUnchanged) {
      NoteUnchanged(t, *f, link.peer());
      continue;
    }
    const auto t0 = env_.clock->Now();
    ASSIGN_OR_RETURN(EpochSummary sum, ReceiveEpoch(link, t, std::move(f).value()));
    RETURN_IF_ERROR(SendAck(link, sum.id.seq, pb::EpochAck::DURABLE, sum.chain));
    SetState(t.volume, [&](VolumeStatusInfo& s) { s.state = VolumeState::kApplying; });
    if (Status st = ApplyAndCommit(t, sum.id.seq); !st.ok()) {
      return ClusterError(t, st, fmt::format("applying epoch {}", sum.id.seq));
    }
    RETURN_IF_ERROR(SendAck(link, sum.id.seq, pb::EpochAck::APPLIED, t.chain));
    PruneCommitted(t);
    t.spool_removal = {};  // joined here: an ended thread keeps its stack
    const double secs = env_.clock->SecondsSince(t0);
    SetState(t.volume, [&](VolumeStatusInfo& s) {
      s.state = VolumeState::kIdle;
      s.last_seq = sum.id.seq;
      s.unchanged_as_of_ns = 0;
      s.last_point_time_ns = sum.id.snap_time_ns;
      s.bytes_total += sum.data_bytes;
      s.epochs_total += 1;
      if (t.resumed) s.resumed_epochs_total += 1;
      s.throughput_bps = secs > 0 ? sum.data_bytes / secs : 0;
      s.CountEpochSeconds(secs);
      s.error.clear();
    });
  }
}

void Sink::NoteUnchanged(const Target& t, const Frame& f, const std::string& peer) {
  pb::Unchanged u;
  if (!u.ParseFromString(f.body)) {
    spdlog::warn("volume {}: an Unchanged frame from {} that does not parse; ignored", t.volume,
                 peer);
    return;
  }
  // Only about the newest point: an older word says nothing of it.
  if (u.seq() != t.last_seq || t.last_seq == 0) return;
  SetState(t.volume, [&](VolumeStatusInfo& s) {
    if (s.last_seq != u.seq()) return;
    s.unchanged_as_of_ns = std::max(s.unchanged_as_of_ns, u.as_of_ns());
    s.unchanged_checks_total += 1;
  });
}

}  // namespace cairn
