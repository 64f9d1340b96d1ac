#include "engine/replication/sink.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <chrono>
#include <ctime>
#include <future>
#include <system_error>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "engine/base/thread_stack.h"
#include "proto/cairn.pb.h"

namespace cairn {
namespace {

// Bytes that may still be written on the file system of `dir` (0 if
// unknown).
uint64_t SpoolFreeBytes(const std::filesystem::path& dir) {
  struct statvfs sv {};
  if (::statvfs(dir.c_str(), &sv) != 0) return 0;
  return static_cast<uint64_t>(sv.f_bavail) * sv.f_frsize;
}

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
    return FailedPrecondition(fmt::format("spool directory {} is not writable: {}", dir.string(),
                                          std::strerror(errno)));
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

// Writing the epoch to the standby head as it arrives stopped: the epoch is
// still spooled, and ApplyAndCommit replays it from there.
void WarnAppliedFromSpool(const std::string& volume, uint64_t seq, const Status& why) {
  spdlog::warn("volume {}: epoch {} is applied from the spool: {}", volume, seq, why.message());
}

}  // namespace

struct Sink::Target {
  std::string volume;
  std::string pool_name;
  std::string image;
  std::string source_site;
  std::shared_ptr<Pool> pool;
  std::shared_ptr<KvStore> kv;
  std::unique_ptr<Catalog> catalog;
  uint64_t last_seq = 0;
  ChainDigest chain;
  std::filesystem::path dir;
  // A durable, verified prefix of epoch last_seq + 1 (after a cut).
  struct Partial {
    uint64_t seq = 0;
    uint64_t records = 0;
    uint64_t offset = 0;  // end of its last whole frame, in spool bytes
  } partial;
  bool resumed = false;  // the epoch being received continues a partial one
  // Where the epoch's receive went, in seconds (the restore point's log
  // line says it): which stage of the pipeline the epoch waited on.
  struct ReceiveTimes {
    double total = 0;      // EpochBegin to synced spool
    double link = 0;       // waiting for frames from the source
    double verify = 0;     // parsing and hashing frames
    double spool = 0;      // appending to the spool
    double standby = 0;    // starting writes to the standby image (a full window waits)
    double tail = 0;       // after the last frame: last writes drain, spool syncs
  } times;
  // A complete epoch is durable in the spool and not applied yet.
  uint64_t durable_seq = 0;
  int64_t last_point_time_ns = 0;  // of the newest point this Target made
  bool recovered = false;   // RecoverSpool ran to its end
  bool sink_fault = false;  // the failure is the sink's (cluster, spool), not the link's
  bool source_fault = false;  // the source abandoned the epoch and said why
  // The standby image's head is known equal to restore point last_seq
  // (this Target took the point's snapshot right after a whole apply and
  // has written nothing since); else PrepareTarget puts it back first.
  bool head_at_point = false;
  // Why the spool refused the epoch: kSpoolDiskFull, kSpoolQuota (else kNone).
  Reason spool_refused = Reason::kNone;
  // The epoch whose records were written to the standby image as they
  // arrived (ReceiveEpoch): ApplyAndCommit then needs no replay of its spool.
  struct Streamed {
    uint64_t seq = 0;
    EpochSummary summary;
    std::unique_ptr<Volume> vol;
    MemoryBudget::Lease memory;          // what apply's window holds
    std::unique_ptr<ApplyStream> apply;  // after vol and memory: destroyed first
  };
  std::unique_ptr<Streamed> streamed;
  // The standby image of the newest commit, kept open for retention
  // (PruneCommitted), which runs after the APPLIED ack: the source's next
  // epoch need not wait for old snapshots to go.
  std::unique_ptr<Volume> committed;
  // The removal of the newest point's spool (its destructor waits for it,
  // as does the next assignment).
  std::future<void> spool_removal;

  std::filesystem::path SpoolPath(uint64_t seq) const { return dir / fmt::format("{}.spool", seq); }
};

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
    Status st = FailedPrecondition(fmt::format(
        "expected Hello from {}, got a {} frame: is it a Cairn source?", link->peer(),
        FrameTypeName(f.type)));
    SendError(*link, st);
    return st;
  }
  if (hello.protocol_version() != kProtocolVersion) {
    Status st = FailedPrecondition(fmt::format(
        "source {} speaks protocol {}, this sink speaks {}: upgrade the older side",
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
    return refuse(FailedPrecondition(fmt::format(
        "pool '{}' is not served by this sink: add it to [sink] pools", t.pool_name)));
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
    if (auto p = pending_.find(t.volume);
        p != pending_.end() && !active_.count(t.volume) &&
        p->second.next > std::chrono::steady_clock::now()) {
      Status st = p->second.error;
      lock.unlock();
      spdlog::debug("refusing source {} for volume '{}': {}", link->peer(), t.volume,
                    st.message());
      SendError(*link, st);
      return st;
    }
    if (auto r = spool_refusals_.find(t.volume);
        r != spool_refusals_.end() && !active_.count(t.volume) &&
        r->second.until > std::chrono::steady_clock::now() &&
        (!r->second.disk || SpoolFreeBytes(env_.spool_dir) < r->second.free_bytes + (4u << 20))) {
      Status st = r->second.error;
      lock.unlock();
      spdlog::debug("refusing source {} for volume '{}': {}", link->peer(), t.volume,
                    st.message());
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
        spdlog::info("volume {}: connection from {} waits for the sink's own apply of a spooled "
                     "epoch",
                     t.volume, link->peer());
      }
    }
    for (const auto& [vol, image] : active_images_) {
      if (vol != t.volume && image == t.pool_name + "/" + t.image) {
        Status st = FailedPrecondition(fmt::format(
            "image {} is already the target of volume '{}': give '{}' another target_image",
            image, vol, t.volume));
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
    return FailedPrecondition(fmt::format(
        "image {}/{} exists at this site but was not created by Cairn for volume '{}': "
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
        st = ResourceExhausted(fmt::format(
            "{}; {}; {}", st.message(), advice,
            kept > 0 ? fmt::format("{} verified records of epoch {} are kept, the source resumes "
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
  if (*step != EpochVerifier::Step::kBegin) return fail(DataLoss("epoch does not start with EpochBegin"));
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
      return fail(DataLoss(fmt::format("resumed epoch {} differs from the spooled one", announced.seq)));
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
    drained = std::async(std::launch::async, [apply = streamed->apply.get()] {
      return apply->Finish();
    });
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

uint64_t Sink::VerifiedRecords(const Target& t, const std::filesystem::path& path, uint64_t seq) {
  auto reader = SpoolReader::Open(path, SpoolIdentity{t.volume, seq});
  if (!reader.ok()) return 0;
  EpochVerifier v(t.volume, t.last_seq, t.chain);
  while (!v.done()) {
    auto f = (*reader)->Next();
    if (!f.ok() || !v.Check(*f).ok()) break;
  }
  return v.begin().seq == seq ? v.begin().records : 0;
}

Status Sink::ReplayPrefix(Target& t, const std::filesystem::path& path, EpochVerifier& verifier) {
  ASSIGN_OR_RETURN(auto reader, SpoolReader::Open(path, SpoolIdentity{t.volume, t.partial.seq}));
  EpochVerifier v(t.volume, t.last_seq, t.chain);
  while (reader->offset() < t.partial.offset) {
    ASSIGN_OR_RETURN(Frame f, reader->Next());
    RETURN_IF_ERROR(v.Check(f).status());
  }
  if (reader->offset() != t.partial.offset || v.begin().records != t.partial.records) {
    return DataLoss(fmt::format("spool of epoch {} changed since it was scanned", t.partial.seq));
  }
  verifier = std::move(v);
  return OkStatus();
}

StatusOr<Sink::PreparedTarget> Sink::PrepareTarget(Target& t) {
  // Never write over an image this volume did not create. The open that
  // tells whether it exists is the one the epoch then writes through.
  std::unique_ptr<Volume> vol;
  if (auto opened = t.pool->Open(t.image); opened.ok()) {
    vol = std::move(opened).value();
  } else if (opened.status().code() != Code::kNotFound) {
    return opened.status();
  }
  bool exists = vol != nullptr;
  TargetState state = TargetState::kHasData;
  if (!exists && t.last_seq > 0) {
    // An increment applied to an empty image would make a restore point
    // that holds only the delta.
    return FailedPrecondition(fmt::format(
        "standby image {}/{} is gone but the catalog lists restore points of volume '{}' up to "
        "{}: it was removed outside Cairn; a full resync is needed",
        t.pool_name, t.image, t.volume, t.last_seq));
  }
  ASSIGN_OR_RETURN(std::string owner, t.catalog->ImageOwner(t.pool_name, t.image));
  if (!owner.empty() && owner != t.volume) {
    return FailedPrecondition(fmt::format(
        "image {}/{} is the standby of volume '{}', not of '{}': set another target_image",
        t.pool_name, t.image, owner, t.volume));
  }
  if (exists && owner == t.volume && t.last_seq == 0) {
    // Ours, with no restore point yet: a first epoch that was cut after
    // some of its records were written. The first epoch lists only the
    // allocated extents of its snapshot, so it must land on a new image,
    // or a block the cut one wrote and the source discarded since would
    // stay. Nothing worth keeping is lost. (A snapshot on it was taken
    // after a whole apply of the epoch now replayed: that one is kept.)
    ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
    if (snaps.empty()) {
      vol.reset();
      RETURN_IF_ERROR(t.pool->Remove(t.image));
      exists = false;
    }
  }
  if (!exists) {
    RETURN_IF_ERROR(t.catalog->SetImageOwner(t.pool_name, t.image, t.volume));
    RETURN_IF_ERROR(t.pool->Create(t.image, 0));
    state = TargetState::kFreshImage;
  } else if (owner.empty()) {
    return FailedPrecondition(fmt::format(
        "image {}/{} exists at this site but was not created by Cairn for volume '{}': "
        "remove or rename it, or set another target_image",
        t.pool_name, t.image, t.volume));
  }
  if (!vol) {
    ASSIGN_OR_RETURN(vol, t.pool->Open(t.image));
  }
  if (t.last_seq > 0) {
    ASSIGN_OR_RETURN(auto before, vol->ListSnaps());
    const std::string base = SnapName(t.last_seq);
    auto point = std::find_if(before.begin(), before.end(),
                              [&](const SnapInfo& s) { return s.name == base; });
    if (point == before.end()) {
      return FailedPrecondition(fmt::format(
          "standby image {}/{} has no snapshot {} although the catalog lists it as restore point "
          "{}: it was removed outside Cairn; a full resync is needed",
          t.pool_name, t.image, base, t.last_seq));
    }
    // The epoch's changes go onto the point they are based on, not onto
    // what an epoch that never completed left on the head.
    uint64_t reverted = 0;
    if (!t.head_at_point) {
      ASSIGN_OR_RETURN(reverted, RevertToPoint(*vol, *point));
    }
    if (reverted > 0) {
      spdlog::warn("volume {}: standby image {}/{} held {} bytes written since restore point {} "
                   "by an epoch that did not complete; they were put back as in the point",
                   t.volume, t.pool_name, t.image, reverted, t.last_seq);
    }
  }
  t.head_at_point = false;  // the epoch writes from here on
  return PreparedTarget{std::move(vol), state};
}

StatusOr<MemoryBudget::Lease> Sink::BorrowApplyMemory(uint64_t max_block, uint64_t image_size,
                                                      EpochOptions* opt) {
  *opt = env_.apply;
  if (!env_.budget) return MemoryBudget::Lease();
  const uint64_t spool = 2 * env_.spool.buffer_bytes;  // SpoolWriter's staging buffers
  // No more than the image holds: a small volume leaves the rest to others.
  const uint64_t window =
      std::min(opt->window_bytes > 0 ? opt->window_bytes : uint64_t{opt->window} * max_block,
               std::max(image_size, max_block));
  auto lease = env_.budget->Acquire(window + spool, std::min(window, max_block) + spool, [this] {
    std::lock_guard lock(mu_);
    return stopping_;
  });
  if (!lease) return Aborted("the sink is stopping");
  opt->window_bytes = std::max<uint64_t>(lease->bytes() > spool ? lease->bytes() - spool : 0, 1);
  return std::move(lease).value();
}

Status Sink::ApplyAndCommit(Target& t, uint64_t seq, int64_t) {
  t.durable_seq = seq;  // until it is a restore point
  const auto path = t.SpoolPath(seq);
  std::unique_ptr<Volume> vol;
  EpochSummary sum;
  const auto since = [](std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  std::string phases;  // for the log line
  if (auto streamed = std::move(t.streamed); streamed && streamed->seq == seq) {
    // Received and written at once (Finish ran as the spool synced; again,
    // it only confirms that nothing is left in flight).
    if (Status st = streamed->apply->Finish(); st.ok()) {
      sum = streamed->summary;
      streamed->apply.reset();
      vol = std::move(streamed->vol);
      const Target::ReceiveTimes& r = t.times;
      phases = fmt::format(
          "received and written in {:.2f} s: waiting for the source {:.2f} s, verifying {:.2f} s, "
          "spooling {:.2f} s, writing the standby image {:.2f} s, last writes and spool sync "
          "{:.2f} s",
          r.total, r.link, r.verify, r.spool, r.standby, r.tail);
    } else {
      WarnAppliedFromSpool(t.volume, seq, st);
    }
  }
  if (!vol) {
    const auto t_apply = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(auto reader, SpoolReader::Open(path, SpoolIdentity{t.volume, seq}));
    EpochVerifier verifier(t.volume, t.last_seq, t.chain);
    ASSIGN_OR_RETURN(PreparedTarget prepared, PrepareTarget(t));
    EpochOptions opt;
    // Its EpochBegin is not read yet: block and image size unknown.
    ASSIGN_OR_RETURN(MemoryBudget::Lease memory, BorrowApplyMemory(kMaxPayload, UINT64_MAX, &opt));
    ASSIGN_OR_RETURN(sum, ApplyEpoch(*reader, verifier, *prepared.vol, opt,
                                     prepared.state));
    vol = std::move(prepared.vol);
    phases = fmt::format("written from the spool {:.2f} s", since(t_apply));
  }
  const auto t_snap = std::chrono::steady_clock::now();

  // A crash after the snapshot but before the catalog leaves the snapshot:
  // it was taken after a complete apply, so it is kept.
  ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
  const std::string snap = SnapName(seq);
  if (std::none_of(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == snap; })) {
    // The standby image is written by this sink alone: no settling.
    RETURN_IF_ERROR(vol->CreateSnap(snap, Volume::Writers::kThisProcessOnly));
  }
  RestorePoint p;
  p.volume = t.volume;
  p.seq = seq;
  p.base_seq = sum.base_seq;
  p.source_time_ns = sum.snap_time_ns;
  p.created_time_ns = NowNs();
  p.pool = t.pool_name;
  p.image = t.image;
  p.snap = snap;
  p.image_size = sum.image_size;
  p.data_bytes = sum.data_bytes;
  p.zero_bytes = sum.zero_bytes;
  p.epoch_digest = sum.epoch_digest;
  p.chain_digest = sum.chain;
  p.source_site = sum.source_site;
  const double snap_secs = since(t_snap);
  const auto t_catalog = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(t.catalog->AddPoint(p));
  const double catalog_secs = since(t_catalog);
  t.last_seq = seq;
  t.chain = sum.chain;
  t.last_point_time_ns = sum.snap_time_ns;
  t.head_at_point = true;
  t.durable_seq = 0;
  // The spool is stale now (RecoverSpool would remove it after a crash).
  // Unlinking a large file takes a while (0.17 s for 1 GiB on ext4): it
  // goes on beside the APPLIED ack and the next epoch, not before them.
  const auto remove_spool = [path] {
    std::error_code ignored;
    std::filesystem::remove(path, ignored);
  };
  try {
    t.spool_removal = std::async(std::launch::async, remove_spool);
  } catch (const std::system_error&) {
    remove_spool();  // no thread to be had: unlink it here
  }
  spdlog::info("volume {}: restore point {} made ({} data bytes, {} zero bytes; {}, snapshot "
               "{:.2f} s, catalog {:.2f} s)",
               t.volume, seq, sum.data_bytes, sum.zero_bytes, phases, snap_secs, catalog_secs);
  if (env_.keep_points > 0) t.committed = std::move(vol);
  return OkStatus();
}

void Sink::PruneCommitted(Target& t) {
  if (auto vol = std::move(t.committed)) PrunePoints(t, *vol);
}

void Sink::PrunePoints(Target& t, Volume& vol) {
  auto points = t.catalog->Points(t.volume);
  if (!points.ok()) {
    spdlog::warn("volume {}: retention skipped: {}", t.volume, points.status().message());
    return;
  }
  if (points->empty()) return;
  const size_t drop = points->size() > env_.keep_points ? points->size() - env_.keep_points : 0;
  const uint64_t oldest_kept = (*points)[drop].seq;
  for (size_t i = 0; i < drop; ++i) {
    if (Status st = t.catalog->RemovePoint(t.volume, (*points)[i].seq); !st.ok()) {
      spdlog::warn("volume {}: retention: removing restore point {} from the catalog: {}",
                   t.volume, (*points)[i].seq, st.message());
      return;
    }
  }
  auto snaps = vol.ListSnaps();
  if (!snaps.ok()) {
    spdlog::warn("volume {}: retention: listing snapshots: {}", t.volume, snaps.status().message());
    return;
  }
  for (const auto& s : *snaps) {
    const auto seq = ParseSnapName(s.name);
    if (!seq || *seq >= oldest_kept) continue;
    if (Status st = vol.RemoveSnap(s.name); !st.ok() && st.code() != Code::kNotFound) {
      spdlog::warn("volume {}: retention: removing snapshot {} (no longer a restore point): {}",
                   t.volume, s.name, st.message());
    }
  }
  if (drop > 0) {
    spdlog::info("volume {}: retention keeps {} restore points: removed {} up to {}", t.volume,
                 env_.keep_points, drop, (*points)[drop - 1].seq);
  }
}

Status Sink::RecoverSpool(Target& t) {
  std::error_code ec;
  t.partial = {};
  // Epochs need not be numbered without gaps (snapshots taken during an
  // outage may be dropped unshipped), but only one is in flight at a time:
  // the lowest seq after the newest point. Any other spool is stale.
  std::map<uint64_t, std::filesystem::path> spools;
  for (const auto& entry : std::filesystem::directory_iterator(t.dir, ec)) {
    const auto name = entry.path().filename().string();
    if (!name.ends_with(".spool")) continue;
    uint64_t seq = 0;
    const std::string stem = name.substr(0, name.size() - 6);
    auto [end, perr] = std::from_chars(stem.data(), stem.data() + stem.size(), seq);
    if (perr != std::errc() || end != stem.data() + stem.size() || seq == 0) continue;
    spools[seq] = entry.path();
  }
  for (const auto& [seq, path] : spools) {
    const std::filesystem::directory_entry entry(path);
    if (seq <= t.last_seq || t.partial.seq != 0 || seq != spools.upper_bound(t.last_seq)->first) {
      // Already applied, or not the next epoch: the source re-sends.
      spdlog::info("volume {}: removing stale spool {}", t.volume, path.string());
      std::filesystem::remove(path, ec);
      continue;
    }
    // Scan: how much of the epoch is there and verifies?
    EpochVerifier v(t.volume, t.last_seq, t.chain);
    uint64_t good_end = 0;
    bool complete = false;
    if (auto reader = SpoolReader::Open(entry.path(), SpoolIdentity{t.volume, seq}); reader.ok()) {
      while (true) {
        auto f = (*reader)->Next();
        if (!f.ok() || !v.Check(*f).ok()) break;
        good_end = (*reader)->offset();
        if (v.done()) {
          complete = true;
          break;
        }
      }
    }
    if (complete) {
      Status st = ApplyAndCommit(t, seq, 0);
      PruneCommitted(t);
      if (st.ok()) {
        spdlog::info("volume {}: applied epoch {} from the spool (durable since an earlier "
                     "session or run)",
                     t.volume, seq);
        continue;
      }
      if (st.code() != Code::kDataLoss) {
        return ClusterError(t, st, fmt::format("applying spooled epoch {}", seq));
      }
      t.durable_seq = 0;
      spdlog::warn("volume {}: discarding spool of epoch {}: {}", t.volume, seq, st.message());
      std::filesystem::remove(entry.path(), ec);
    } else if (v.begin().seq == seq && v.begin().records > 0) {
      t.partial = {seq, v.begin().records, good_end};
      spdlog::info("volume {}: {} verified records of epoch {} are spooled; the source may resume",
                   t.volume, t.partial.records, seq);
    } else {
      std::filesystem::remove(entry.path(), ec);
    }
  }
  return OkStatus();
}

Status Sink::ScheduleRetryLocked(const std::string& volume, const Target& t, const Status& st) {
  Pending& p = pending_[volume];
  if (!t.pool_name.empty() && !t.image.empty()) {
    p.pool = t.pool_name;
    p.image = t.image;
  }
  if (t.durable_seq != 0) p.seq = t.durable_seq;
  p.backoff = p.backoff.count() == 0 ? env_.retry_min : std::min(p.backoff * 2, env_.retry_max);
  p.next = std::chrono::steady_clock::now() + p.backoff;
  const Status out(st.code(),
                   fmt::format("{}; {} is durable in the spool and the sink applies it by itself "
                               "as soon as it can (retrying with backoff)",
                               st.message(),
                               p.seq != 0 ? fmt::format("epoch {}", p.seq) : "an epoch"));
  p.error = out;
  VolumeStatusInfo& s = status_[volume];
  s.volume = volume;
  s.role = "sink";
  s.state = VolumeState::kError;
  s.error = out.ToString();
  return out;
}

void Sink::RetryLoop() {
  using Clock = std::chrono::steady_clock;
  {
    // Complete spools a previous run left: applied without waiting for
    // their sources (which may be gone for good: a lost primary site).
    std::vector<std::string> found;
    std::error_code ec;
    for (const auto& d : std::filesystem::directory_iterator(env_.spool_dir, ec)) {
      std::error_code ec2;
      if (!d.is_directory(ec2) || !ValidateVolumeId(d.path().filename().string()).ok()) continue;
      for (const auto& f : std::filesystem::directory_iterator(d.path(), ec2)) {
        if (f.path().extension() == ".spool") {
          found.push_back(d.path().filename().string());
          break;
        }
      }
    }
    std::lock_guard lock(mu_);
    for (const auto& v : found) {
      if (!pending_.count(v)) pending_[v].next = Clock::now();
    }
  }
  std::unique_lock lock(mu_);
  std::map<std::string, std::string> logged;  // volume -> last error logged
  while (!stopping_) {
    const auto now = Clock::now();
    auto wake = Clock::time_point::max();
    std::string volume;
    for (const auto& [v, p] : pending_) {
      if (active_.count(v)) continue;  // its session retries
      if (p.next <= now) {
        volume = v;
        break;
      }
      wake = std::min(wake, p.next);
    }
    if (volume.empty()) {
      if (wake == Clock::time_point::max()) {
        retry_cv_.wait(lock);
      } else {
        retry_cv_.wait_until(lock, wake);
      }
      continue;
    }
    const Pending p = pending_[volume];
    const std::string image = p.pool.empty() ? "" : p.pool + "/" + p.image;
    active_[volume] = nullptr;  // held: a connection for it waits
    if (!image.empty()) active_images_[volume] = image;
    lock.unlock();
    Target t;
    Status st = RetryApply(volume, p, t);
    lock.lock();
    active_.erase(volume);
    active_images_.erase(volume);
    if (st.ok()) {
      pending_.erase(volume);
      logged.erase(volume);
    } else {
      const Status out = ScheduleRetryLocked(volume, t, st);
      ++status_[volume].errors_total;
      if (logged[volume] != st.message()) {
        spdlog::warn("volume {}: {}", volume, out.message());
        logged[volume] = st.message();
      }
    }
    released_.notify_all();
  }
}

Status Sink::RetryApply(const std::string& volume, const Pending& p, Target& t) {
  t.volume = volume;
  t.dir = env_.spool_dir / volume;
  t.pool_name = p.pool;
  t.image = p.image;
  if (t.pool_name.empty()) {
    auto pool = FindVolumePool(volume);
    if (pool.status().code() == Code::kNotFound) {
      spdlog::info("volume {}: a spool is left but no restore point: it waits for its source",
                   volume);
      return OkStatus();
    }
    if (!pool.ok()) return ClusterError(t, pool.status(), "reading the catalogs");
    t.pool_name = *pool;
  }
  auto pool = env_.open_pool(t.pool_name);
  if (!pool.ok()) return ClusterError(t, pool.status(), "opening pool " + t.pool_name);
  t.pool = *pool;
  auto kv = env_.open_catalog(t.pool_name);
  if (!kv.ok()) return ClusterError(t, kv.status(), "opening the catalog in " + t.pool_name);
  t.kv = *kv;
  t.catalog = std::make_unique<Catalog>(*t.kv);
  auto latest = t.catalog->Latest(volume);
  if (!latest.ok()) return ClusterError(t, latest.status(), "reading the catalog");
  if (*latest) {
    t.last_seq = (*latest)->seq;
    t.chain = (*latest)->chain_digest;
    t.source_site = (*latest)->source_site;
    if (t.image.empty()) t.image = (*latest)->image;
  }
  if (t.image.empty()) return OkStatus();  // no point yet: its source names the image
  const uint64_t before = t.last_seq;
  RETURN_IF_ERROR(RecoverSpool(t));
  if (t.last_seq > before) {
    spdlog::info("volume {}: restore point {} made from the spool by the sink itself (no source "
                 "connected)",
                 volume, t.last_seq);
    SetState(volume, [&](VolumeStatusInfo& s) {
      s.state = VolumeState::kDisconnected;
      s.pool = t.pool_name;
      s.image = t.image;
      s.last_seq = t.last_seq;
      s.last_point_time_ns = t.last_point_time_ns;
      s.epochs_total += 1;
      s.error.clear();
    });
  }
  return OkStatus();
}

StatusOr<std::string> Sink::FindVolumePool(const std::string& volume) {
  RETURN_IF_ERROR(ValidateVolumeId(volume));
  for (const auto& pool : env_.pools) {
    ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool));
    Catalog catalog(*kv);
    ASSIGN_OR_RETURN(auto latest, catalog.Latest(volume));
    if (latest) return pool;
  }
  return NotFound(fmt::format("volume '{}' has no restore point at this site", volume));
}

StatusOr<std::vector<RestorePoint>> Sink::Points(const std::string& volume) {
  ASSIGN_OR_RETURN(std::string pool, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool));
  return Catalog(*kv).Points(volume);
}

StatusOr<PromoteResult> Sink::Promote(const std::string& volume, uint64_t seq,
                                      const std::string& pool_hint,
                                      const std::string& to_image) {
  if (to_image.empty()) return InvalidArgument("promote: no image name to promote into");
  ASSIGN_OR_RETURN(std::string pool_name, FindVolumePool(volume));
  if (!pool_hint.empty() && pool_hint != pool_name) {
    return InvalidArgument(fmt::format(
        "volume '{}' has its restore points in pool {}, not {}: a promoted image lives in the "
        "pool of its restore point",
        volume, pool_name, pool_hint));
  }
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(auto promoted, catalog.GetPromotion(volume));
  if (promoted) {
    if (promoted->image != to_image || (seq != 0 && seq != promoted->seq)) {
      return FailedPrecondition(fmt::format(
          "volume '{}' is already failed over: point {} was promoted into {}/{}; release it "
          "first",
          volume, promoted->seq, promoted->pool, promoted->image));
    }
    ASSIGN_OR_RETURN(RestorePoint point, catalog.Get(volume, promoted->seq));
    ASSIGN_OR_RETURN(auto pool, env_.open_pool(pool_name));
    ASSIGN_OR_RETURN(bool exists, pool->Exists(to_image));
    if (!exists) {  // a crash between the fence and the clone
      RETURN_IF_ERROR(pool->Clone(point.image, point.snap, to_image));
    }
    return PromoteResult{pool_name, to_image, point, true};
  }
  RestorePoint point;
  if (seq == 0) {
    ASSIGN_OR_RETURN(auto latest, catalog.Latest(volume));
    if (!latest) return NotFound(fmt::format("volume '{}' has no restore point", volume));
    point = *latest;
  } else {
    ASSIGN_OR_RETURN(point, catalog.Get(volume, seq));
  }
  ASSIGN_OR_RETURN(auto pool, env_.open_pool(pool_name));
  ASSIGN_OR_RETURN(bool exists, pool->Exists(to_image));
  if (exists) {
    return AlreadyExists(fmt::format(
        "image {}/{} already exists at site {}: it is not overwritten; rename or remove it, or "
        "promote into another name",
        pool_name, to_image, env_.site));
  }
  // Fence first: from here on the volume's source is refused, and a session
  // in progress is ended, so the promoted point is the volume's last word.
  RETURN_IF_ERROR(catalog.SetPromotion(volume, {point.seq, pool_name, to_image}));
  {
    std::lock_guard lock(mu_);
    if (auto it = active_.find(volume); it != active_.end() && it->second != nullptr) {
      it->second->Close();
    }
  }
  if (Status st = pool->Clone(point.image, point.snap, to_image); !st.ok()) {
    (void)catalog.ClearPromotion(volume);
    return st.Annotate(fmt::format("promoting restore point {} of '{}'", point.seq, volume));
  }
  spdlog::warn("volume {}: FAILED OVER to site {}: restore point {} (source time {} ns) promoted "
               "into {}/{}; its source is refused until it is released",
               volume, env_.site, point.seq, point.source_time_ns, pool_name, to_image);
  return PromoteResult{pool_name, to_image, point, false};
}

StatusOr<std::string> Sink::Release(const std::string& volume) {
  ASSIGN_OR_RETURN(std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(auto promoted, catalog.GetPromotion(volume));
  if (!promoted) {
    return FailedPrecondition(
        fmt::format("volume '{}' is not failed over at site {}: nothing to release", volume,
                    env_.site));
  }
  ASSIGN_OR_RETURN(auto pool, env_.open_pool(promoted->pool));
  std::string kept;
  ASSIGN_OR_RETURN(bool exists, pool->Exists(promoted->image));
  if (exists) {
    // Kept, never deleted: it may hold writes made here while failed over.
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
    kept = fmt::format("{}.failback-{}", promoted->image, stamp);
    RETURN_IF_ERROR(pool->Rename(promoted->image, kept));
  }
  RETURN_IF_ERROR(catalog.ClearPromotion(volume));
  spdlog::warn("volume {}: released at site {} (failback); the promoted image {}/{} is kept as {}",
               volume, env_.site, promoted->pool, promoted->image,
               kept.empty() ? "(it was removed)" : kept);
  return kept;
}

StatusOr<RestoreResult> Sink::Restore(const std::string& volume, uint64_t seq,
                                      const std::string& to_image, bool full,
                                      const ProgressFn& progress) {
  if (to_image.empty()) return InvalidArgument("no image name to restore to");
  ASSIGN_OR_RETURN(std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  RestorePoint point;
  if (seq == 0) {
    ASSIGN_OR_RETURN(auto latest, catalog.Latest(volume));
    if (!latest) return NotFound(fmt::format("volume '{}' has no restore point", volume));
    point = *latest;
  } else {
    ASSIGN_OR_RETURN(point, catalog.Get(volume, seq));
  }
  ASSIGN_OR_RETURN(auto pool, env_.open_pool(pool_name));
  ASSIGN_OR_RETURN(bool exists, pool->Exists(to_image));
  if (exists) {
    return AlreadyExists(fmt::format("image {}/{} already exists: choose another name with --to",
                                     pool_name, to_image));
  }
  if (full) {
    RETURN_IF_ERROR(pool->Copy(point.image, point.snap, to_image, progress));
  } else {
    RETURN_IF_ERROR(pool->Clone(point.image, point.snap, to_image));
  }
  spdlog::info("volume {}: restore point {} restored to {}/{} ({})", volume, point.seq, pool_name,
               to_image, full ? "full copy" : "clone");
  return RestoreResult{pool_name, to_image, point, full ? "full" : "clone"};
}

}  // namespace cairn
