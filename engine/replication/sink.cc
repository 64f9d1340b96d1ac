// Sink: sessions with sources, and receiving epochs into the spool and the
// standby image (sink.h says what the sink is).

#include "engine/replication/sink.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <ctime>
#include <future>
#include <system_error>

#include "engine/base/thread_stack.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {

void WarnAppliedFromSpool(const std::string& volume, uint64_t seq, const Status& why) {
  spdlog::warn("volume {}: epoch {} is applied from the spool: {}", volume, seq, why.message());
}

uint64_t SpoolFreeBytes(const std::filesystem::path& dir) {
  struct statvfs sv {};
  if (::statvfs(dir.c_str(), &sv) != 0) return 0;
  return static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
}

namespace {

void SendError(Link& link, const Status& st) { (void)WriteLinkError(link, st); }

}  // namespace

Status CheckSpoolWritable(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    return FailedPrecondition(
        fmt::format("spool directory {} cannot be created: {}", dir.string(), ec.message()));
  }
  const auto probe = dir / fmt::format(".cairn-check-{}", ::getpid());
  const int fd = ::open(probe.c_str(), O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    return FailedPrecondition(
        fmt::format("spool directory {} is not writable: {}", dir.string(), std::strerror(errno)));
  }
  const char block[4096] = {};
  const bool written = ::write(fd, block, sizeof block) == static_cast<ssize_t>(sizeof block) &&
                       ::fdatasync(fd) == 0;
  const int err = errno;
  ::close(fd);
  std::filesystem::remove(probe, ec);
  if (!written) {
    return FailedPrecondition(fmt::format("spool directory {} does not take a synced write: {}",
                                          dir.string(), std::strerror(err)));
  }
  return OkStatus();
}

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
    if (c.last_point_time_ns > 0) c.lag_seconds = (NowNs() - held_at) / 1e9;
    out.push_back(c);
  }
  return out;
}

uint64_t Sink::corrupt_frames() const {
  std::lock_guard lock(mu_);
  return corrupt_frames_;
}

Status Sink::Serve(Link& link_ref) {
  Link* link = &link_ref;
  auto first = link->Receive(env_.timeouts.hello);
  if (!first.ok()) {
    const Code code = first.status().code();
    if (code == Code::kDataLoss) {
      std::lock_guard lock(mu_);
      ++corrupt_frames_;  // of no known volume yet
    }
    // Not a Cairn peer, or one of another version: tell it why, in case it
    // can read our frames.
    if (code == Code::kDataLoss || code == Code::kFailedPrecondition) {
      SendError(*link, first.status());
    }
    return first.status();
  }
  const Frame& f = *first;
  pb::Hello hello;
  if (f.type != FrameType::kHello || !hello.ParseFromString(f.body)) {
    Status st = FailedPrecondition(
        fmt::format("expected Hello from {}, got a {} frame: is it a Cairn source?", link->peer(),
                    FrameTypeName(f.type)));
    SendError(*link, st);
    return st;
  }
  if (hello.protocol_version() != kProtocolVersion) {
    Status st = FailedPrecondition(
        fmt::format("source {} speaks protocol {}, this sink speaks {}: upgrade the older side",
                    link->peer(), hello.protocol_version(), kProtocolVersion));
    SendError(*link, st);
    return st;
  }
  Target t;
  t.volume = hello.volume();
  t.pool_name = hello.pool();
  t.image = hello.image();
  t.source_site = hello.source_site();
  bool known_volume = false;  // a valid id: its status shows the refusal
  auto refuse = [&](const cairn::Status& st) {
    spdlog::error("refusing source {} for volume '{}': {}", link->peer(), t.volume, st.message());
    if (known_volume && !hello.probe()) {
      SetState(t.volume, [&](VolumeStatusInfo& s) {
        s.state = VolumeState::kError;
        s.error = "refused the source " + link->peer() + ": " + st.ToString();
        ++s.errors_total;
        if (s.pool.empty()) s.pool = t.pool_name;
        if (s.image.empty()) s.image = t.image;
      });
    }
    SendError(*link, st);
    return st;
  };
  if (Status st = ValidateVolumeId(t.volume); !st.ok()) return refuse(st);
  known_volume = true;
  if (t.image.empty()) return refuse(InvalidArgument("Hello names no target image"));
  if (std::find(env_.pools.begin(), env_.pools.end(), t.pool_name) == env_.pools.end()) {
    return refuse(FailedPrecondition(
        fmt::format("pool '{}' is not served by this sink: add it to [sink] pools", t.pool_name)));
  }
  auto pool = env_.open_pool(t.pool_name);
  if (!pool.ok()) return refuse(pool.status());
  t.pool = *pool;
  auto kv = env_.open_catalog(t.pool_name);
  if (!kv.ok()) return refuse(kv.status());
  t.kv = *kv;
  t.catalog = std::make_unique<Catalog>(*t.kv);
  if (auto promoted = t.catalog->GetPromotion(t.volume); !promoted.ok()) {
    return refuse(promoted.status());
  } else if (*promoted) {
    return refuse(FailedPrecondition(fmt::format(
        "volume '{}' is failed over to site {}: restore point {} was promoted into {}/{}; "
        "release it (failback) before it replicates again",
        t.volume, env_.site, (*promoted)->seq, (*promoted)->pool, (*promoted)->image)));
  }
  t.dir = env_.spool_dir / t.volume;
  std::error_code ec;
  std::filesystem::create_directories(t.dir, ec);
  if (ec) {
    return refuse(FailedPrecondition(
        fmt::format("cannot create spool directory {}: {}", t.dir.string(), ec.message())));
  }
  if (hello.probe()) {
    if (Status st = CheckProbe(t); !st.ok()) return refuse(st);
    pb::HelloReply reply;
    reply.set_protocol_version(kProtocolVersion);
    reply.set_last_applied_seq(t.last_seq);
    reply.set_last_chain(t.chain.AsBytes());
    reply.set_sink_site(env_.site);
    spdlog::info("volume {}: {} checked this sink (cairnd --check): it would be taken", t.volume,
                 link->peer());
    return link->Send(FrameType::kHelloReply, reply.SerializeAsString(), {});
  }
  {
    std::unique_lock lock(mu_);
    // The standby cluster failed a moment ago with an epoch durable in the
    // spool: the sink retries by itself; say so at once rather than make
    // the source wait for another op timeout.
    if (auto p = pending_.find(t.volume); p != pending_.end() && !active_.count(t.volume) &&
                                          p->second.next > std::chrono::steady_clock::now()) {
      Status st = p->second.error;
      lock.unlock();
      spdlog::debug("refusing source {} for volume '{}': {}", link->peer(), t.volume, st.message());
      SendError(*link, st);
      return st;
    }
    if (auto r = spool_refusals_.find(t.volume);
        r != spool_refusals_.end() && !active_.count(t.volume) &&
        r->second.until > std::chrono::steady_clock::now() &&
        (!r->second.disk || SpoolFreeBytes(env_.spool_dir) < r->second.free_bytes + (4u << 20))) {
      Status st = r->second.error;
      lock.unlock();
      spdlog::debug("refusing source {} for volume '{}': {}", link->peer(), t.volume, st.message());
      SendError(*link, st);
      return st;
    }
    // A source that reconnects after a cut replaces its old session, which
    // may not have noticed the cut yet (a half-open TCP connection).
    if (auto it = active_.find(t.volume); it != active_.end()) {
      if (it->second != nullptr) {
        spdlog::warn("volume {}: new connection from {} replaces the session of {}", t.volume,
                     link->peer(), it->second->peer());
        it->second->Close();
      } else {
        spdlog::info(
            "volume {}: connection from {} waits for the sink's own apply of a spooled "
            "epoch",
            t.volume, link->peer());
      }
    }
    for (const auto& [vol, image] : active_images_) {
      if (vol != t.volume && image == t.pool_name + "/" + t.image) {
        Status st = FailedPrecondition(fmt::format(
            "image {} is already the target of volume '{}': give '{}' another target_image", image,
            vol, t.volume));
        SendError(*link, st);
        return st;
      }
    }
    if (!released_.wait_for(lock, std::chrono::seconds(30),
                            [&] { return !active_.count(t.volume); })) {
      Status st = Unavailable(
          active_[t.volume] == nullptr
              ? fmt::format("volume '{}': the sink is still applying a spooled epoch to the "
                            "standby cluster after 30 s; try again",
                            t.volume)
              : fmt::format("volume '{}': the previous session did not end within 30 s; try again",
                            t.volume));
      SendError(*link, st);
      return st;
    }
    active_[t.volume] = link;
    active_images_[t.volume] = t.pool_name + "/" + t.image;
  }
  Status st = Session(*link, t);
  {
    std::lock_guard lock(mu_);
    active_.erase(t.volume);
    active_images_.erase(t.volume);
    // A replaced session leaves the status to the session that replaced it.
    VolumeStatusInfo& s = status_[t.volume];
    if (st.code() == Code::kDataLoss) {  // a frame failed verification
      ++corrupt_frames_;
      ++s.corrupt_frames_total;
    }
    if (!active_.count(t.volume)) {
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
        r.error = st;
        r.disk = t.spool_refused == Reason::kSpoolDiskFull;
        r.free_bytes = SpoolFreeBytes(env_.spool_dir);
        r.until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      } else if (t.recovered) {
        spool_refusals_.erase(t.volume);
      }
    }
  }
  released_.notify_all();
  retry_cv_.notify_all();
  if (!st.ok() && st.code() != Code::kAborted) SendError(*link, st);
  return st.code() == Code::kAborted ? OkStatus() : st;
}

Status Sink::CheckProbe(Target& t) {
  RETURN_IF_ERROR(LoadLatest(t).status());
  ASSIGN_OR_RETURN(std::string owner, t.catalog->ImageOwner(t.pool_name, t.image));
  if (!owner.empty() && owner != t.volume) {
    return FailedPrecondition(fmt::format(
        "image {}/{} is the standby of volume '{}', not of '{}': set another target_image",
        t.pool_name, t.image, owner, t.volume));
  }
  ASSIGN_OR_RETURN(bool exists, t.pool->Exists(t.image));
  if (exists && owner.empty()) {
    return FailedPrecondition(
        fmt::format("image {}/{} exists at this site but was not created by Cairn for volume '{}': "
                    "remove or rename it, or set another target_image",
                    t.pool_name, t.image, t.volume));
  }
  return CheckSpoolWritable(t.dir);
}

StatusOr<std::optional<RestorePoint>> Sink::LoadLatest(Target& t) {
  auto latest = t.catalog->Latest(t.volume);
  if (!latest.ok()) return ClusterError(t, latest.status(), "reading the catalog");
  if (*latest) {
    t.last_seq = (*latest)->seq;
    t.chain = (*latest)->chain_digest;
    // Two primaries for one volume would interleave two histories.
    const std::string& from = (*latest)->source_site;
    if (!from.empty() && !t.source_site.empty() && from != t.source_site) {
      return FailedPrecondition(fmt::format(
          "volume '{}' is replicated from site '{}'; refusing a second source at site '{}'",
          t.volume, from, t.source_site));
    }
  }
  return latest;
}

Status Sink::Session(Link& link, Target& t) {
  ASSIGN_OR_RETURN(const std::optional<RestorePoint> latest, LoadLatest(t));
  RETURN_IF_ERROR(RecoverSpool(t));
  t.recovered = true;
  SetState(t.volume, [&](VolumeStatusInfo& s) {
    s.state = VolumeState::kIdle;
    s.pool = t.pool_name;
    s.image = t.image;
    s.peer = link.peer();
    s.last_seq = t.last_seq;
    if (latest) s.last_point_time_ns = latest->source_time_ns;
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
  if (t.partial.records > 0) {
    reply.set_resume_seq(t.partial.seq);
    reply.set_resume_records(t.partial.records);
  }
  RETURN_IF_ERROR(link.Send(FrameType::kHelloReply, reply.SerializeAsString(), {}));
  spdlog::info("volume {}: source {} connected; newest restore point {}", t.volume, link.peer(),
               t.last_seq);

  while (true) {
    // Most of a session's life is this wait: its deep stack goes back.
    ReleaseStackBelowHere();
    auto f = link.Receive(env_.timeouts.idle);
    if (!f.ok()) return f.status();
    if (f->type == FrameType::kUnchanged) {
      NoteUnchanged(t, *f, link.peer());
      continue;
    }
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(EpochSummary sum, ReceiveEpoch(link, t, std::move(f).value()));
    RETURN_IF_ERROR(SendAck(link, sum.seq, pb::EpochAck::DURABLE, sum.chain));
    SetState(t.volume, [&](VolumeStatusInfo& s) { s.state = VolumeState::kApplying; });
    if (Status st = ApplyAndCommit(t, sum.seq, sum.snap_time_ns); !st.ok()) {
      return ClusterError(t, st, fmt::format("applying epoch {}", sum.seq));
    }
    RETURN_IF_ERROR(SendAck(link, sum.seq, pb::EpochAck::APPLIED, t.chain));
    PruneCommitted(t);
    t.spool_removal = {};  // joined here: an ended thread keeps its stack
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    SetState(t.volume, [&](VolumeStatusInfo& s) {
      s.state = VolumeState::kIdle;
      s.last_seq = sum.seq;
      s.unchanged_as_of_ns = 0;
      s.last_point_time_ns = sum.snap_time_ns;
      s.bytes_total += sum.data_bytes;
      s.epochs_total += 1;
      if (t.resumed) s.resumed_epochs_total += 1;
      s.throughput_bps = secs > 0 ? sum.data_bytes / secs : 0;
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

StatusOr<EpochSummary> Sink::ReceiveEpoch(Link& link, Target& t, Frame begin) {
  EpochVerifier verifier(t.volume, t.last_seq, t.chain);
  std::unique_ptr<SpoolWriter> spool;
  std::filesystem::path path;
  uint64_t spooled_records = 0;  // whole Record frames in the spool
  bool at_end = false;           // the failure is the epoch's end
  t.streamed.reset();
  std::unique_ptr<Target::Streamed> streamed;
  auto fail = [&](const cairn::Status& cause) -> cairn::Status {
    streamed.reset();  // its writes end first; the head stays between two points
    Status st = cause;
    const uint64_t seq = verifier.begin().seq;
    // Keep what was verified and spooled, durably: the source re-sends only
    // the rest. If it cannot be made durable it is worth nothing, and an
    // epoch whose end does not verify as a whole starts over (resuming it
    // would fail the same way every time).
    uint64_t kept = 0;
    // Nor is anything kept of an epoch its source abandoned: what it read
    // may not be its snapshot's.
    if (spool && !t.source_fault && !(at_end && st.code() == Code::kDataLoss)) {
      if (spool->Sync().ok()) {
        kept = spooled_records;
      } else if (spool->SyncWritten().ok()) {
        // A write failed (a full disk): what reached the file is durable
        // now; read it back to learn how much of it is whole and verifies.
        spool.reset();
        kept = VerifiedRecords(t, path, seq);
      }
    }
    if (st.code() == Code::kResourceExhausted) {
      t.sink_fault = true;
      std::string advice;
      if (st.reason() == Reason::kSpoolDiskFull) {
        advice = fmt::format("free space in {} or move [sink] spool_dir", env_.spool_dir.string());
      } else if (st.reason() == Reason::kSpoolQuota) {
        advice = "raise [sink] spool_max_bytes and restart cairnd";
      }
      t.spool_refused = st.reason();
      if (!advice.empty()) {
        st = ResourceExhausted(
                 fmt::format(
                     "{}; {}; {}", st.message(), advice,
                     kept > 0 ? fmt::format(
                                    "{} verified records of epoch {} are kept, the source resumes "
                                    "after them",
                                    kept, seq)
                              : fmt::format("nothing of epoch {} is kept", seq)))
                 .WithReason(st.reason());
      }
    }
    if (st.code() == Code::kAborted) {
      // The source went away mid-epoch (stopped, restarted, its link cut).
      spdlog::warn("volume {}: epoch {} cut short: {}", t.volume, seq, st.message());
    } else {
      spdlog::error("volume {}: epoch refused: {}", t.volume, st.message());
    }
    if (kept > 0) {
      spdlog::info("volume {}: kept {} verified records of epoch {} for resume", t.volume, kept,
                   seq);
    } else if (!path.empty()) {
      spool.reset();
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
    return st;
  };
  // A failure of the spool itself (disk full, quota, I/O): the sink's fault.
  auto spool_fail = [&](const cairn::Status& st) -> cairn::Status {
    t.sink_fault = true;
    return fail(st);
  };

  auto step = verifier.Check(begin);
  if (!step.ok()) return fail(step.status());
  if (*step != EpochVerifier::Step::kBegin)
    return fail(DataLoss("epoch does not start with EpochBegin"));
  const EpochSummary announced = verifier.begin();
  path = t.SpoolPath(announced.seq);
  // The epoch's memory (spool buffers, apply window) before anything is
  // made of it: a session that waits for its share holds nothing meanwhile
  // (a thousand of them, each with its spool's buffers, were most of a
  // sink's peak RSS).
  EpochOptions opt;
  auto memory = BorrowApplyMemory(announced.max_block, announced.image_size, &opt);
  if (!memory.ok()) return fail(memory.status());
  if (announced.resume_from > 0) {
    if (t.partial.seq != announced.seq || t.partial.records != announced.resume_from) {
      return fail(DataLoss(fmt::format(
          "source resumes epoch {} at record {}, but this sink holds {} records of epoch {}",
          announced.seq, announced.resume_from, t.partial.records, t.partial.seq)));
    }
    // Rebuild the verifier's state from the spooled prefix; the resumed
    // stream must continue exactly where it ends.
    auto st = ReplayPrefix(t, path, verifier);
    if (!st.ok()) return fail(st);
    const EpochSummary& had = verifier.begin();
    if (had.base_seq != announced.base_seq || had.image_size != announced.image_size ||
        had.snap_time_ns != announced.snap_time_ns || had.max_block != announced.max_block) {
      return fail(
          DataLoss(fmt::format("resumed epoch {} differs from the spooled one", announced.seq)));
    }
    auto w = SpoolWriter::Resume(path, t.partial.offset, env_.spool);
    if (!w.ok()) return spool_fail(w.status());
    spool = std::move(w).value();
    spooled_records = t.partial.records;
    t.resumed = true;
  } else {
    t.resumed = false;
    auto w = SpoolWriter::Create(path, SpoolIdentity{t.volume, announced.seq}, env_.spool);
    if (!w.ok()) return spool_fail(w.status());
    spool = std::move(w).value();
    const auto header = EncodeHeader(begin.type, begin.body, 0);
    if (Status st = spool->Append(header, begin.body, {}); !st.ok()) return spool_fail(st);
  }
  t.partial = {};
  if (!t.resumed) {
    // Apply while receiving. If the standby image cannot take it now, the
    // epoch is still spooled and ApplyAndCommit replays it (and reports why).
    auto prepared = PrepareTarget(t);
    if (prepared.ok()) {
      streamed = std::make_unique<Target::Streamed>();
      streamed->seq = announced.seq;
      streamed->vol = std::move(prepared->vol);
      streamed->memory = std::move(memory).value();
      streamed->apply = std::make_unique<ApplyStream>(*streamed->vol, opt, prepared->state);
      if (Status st = streamed->apply->Begin(announced.image_size); !st.ok()) {
        WarnAppliedFromSpool(t.volume, announced.seq, st);
        streamed.reset();
      }
    }
  }
  SetState(t.volume, [&](VolumeStatusInfo& s) { s.state = VolumeState::kReceiving; });
  using Clock = std::chrono::steady_clock;
  Target::ReceiveTimes times;
  const auto t_begin = Clock::now();
  auto lap = t_begin;
  // Adds the time since the previous lap to `stage`.
  const auto stage_done = [&lap](double& stage) {
    const auto now = Clock::now();
    stage += std::chrono::duration<double>(now - lap).count();
    lap = now;
  };
  while (true) {
    auto next = link.Receive(env_.timeouts.stall);
    stage_done(times.link);
    if (!next.ok()) return fail(next.status());
    const Frame& f = *next;
    if (f.type == FrameType::kLinkError) {
      // In place of the epoch's end: the source could not read all of it
      // (its snapshot or image vanished, a read failed). Nothing of it may
      // become a point.
      t.source_fault = true;
      const Status why = StatusFromLinkError(f, "source");
      const bool plain = why.code() != Code::kDataLoss && why.code() != Code::kAborted;
      return fail(Status(plain ? why.code() : Code::kFailedPrecondition,
                         fmt::format("epoch {} abandoned by its {}; no restore point is made of it",
                                     announced.seq, why.message())));
    }
    at_end = f.type == FrameType::kEpochEnd;
    step = verifier.Check(f);
    stage_done(times.verify);
    if (!step.ok()) return fail(step.status());
    if (*step == EpochVerifier::Step::kBegin) return fail(DataLoss("EpochBegin inside an epoch"));
    const auto header = EncodeHeader(f.type, f.body, static_cast<uint32_t>(f.payload.size()));
    Status appended = spool->Append(header, f.body, f.payload);
    stage_done(times.spool);
    if (!appended.ok()) return spool_fail(appended);
    if (*step == EpochVerifier::Step::kEnd) break;
    ++spooled_records;
    if (streamed) {
      Status st = streamed->apply->Add(verifier.record(), std::move(next).value());
      stage_done(times.standby);
      if (!st.ok()) {
        WarnAppliedFromSpool(t.volume, announced.seq, st);
        streamed.reset();
      }
    }
  }
  at_end = true;
  const auto t_end = Clock::now();
  // The last writes to the standby image drain while the spool syncs.
  std::future<Status> drained;
  if (streamed) {
    drained =
        std::async(std::launch::async, [apply = streamed->apply.get()] { return apply->Finish(); });
  }
  auto synced = spool->Sync();
  if (drained.valid()) {
    if (Status st = drained.get(); !st.ok()) {
      WarnAppliedFromSpool(t.volume, announced.seq, st);
      streamed.reset();
    }
  }
  if (!synced.ok()) return spool_fail(synced.status());
  const auto t_synced = Clock::now();
  times.tail = std::chrono::duration<double>(t_synced - t_end).count();
  times.total = std::chrono::duration<double>(t_synced - t_begin).count();
  t.times = times;
  if (streamed) {
    streamed->summary = verifier.summary();
    t.streamed = std::move(streamed);
  }
  return verifier.summary();
}

}  // namespace cairn
