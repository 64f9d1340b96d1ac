#include "engine/sink.h"

#include <charconv>
#include <chrono>
#include <system_error>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "proto/cairn.pb.h"

namespace cairn {
namespace {

void SendError(Link& link, const Status& st) {
  pb::LinkError e;
  e.set_code(static_cast<int>(st.code()));
  e.set_message(st.message());
  (void)link.Send(FrameType::kLinkError, e.SerializeAsString(), {});
}

Status SendAck(Link& link, uint64_t seq, pb::EpochAck::Stage stage, const ChainDigest& chain) {
  pb::EpochAck ack;
  ack.set_seq(seq);
  ack.set_stage(stage);
  ack.set_chain_digest(chain.AsBytes());
  return link.Send(FrameType::kEpochAck, ack.SerializeAsString(), {});
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

  std::filesystem::path SpoolPath(uint64_t seq) const { return dir / fmt::format("{}.spool", seq); }
};

Sink::Sink(SinkEnv env) : env_(std::move(env)) {}

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
    if (c.last_point_time_ns > 0) c.lag_seconds = (NowNs() - c.last_point_time_ns) / 1e9;
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
  ASSIGN_OR_RETURN(Frame f, link->Receive(env_.timeouts.hello));
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
  auto refuse = [&](const cairn::Status& st) {
    spdlog::error("refusing source {} for volume '{}': {}", link->peer(), t.volume, st.message());
    SendError(*link, st);
    return st;
  };
  if (Status st = ValidateVolumeId(t.volume); !st.ok()) return refuse(st);
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
  t.dir = env_.spool_dir / t.volume;
  std::error_code ec;
  std::filesystem::create_directories(t.dir, ec);
  if (ec) {
    return refuse(FailedPrecondition(
        fmt::format("cannot create spool directory {}: {}", t.dir.string(), ec.message())));
  }
  {
    // A source that reconnects after a cut replaces its old session, which
    // may not have noticed the cut yet (a half-open TCP connection).
    std::unique_lock lock(mu_);
    if (auto it = active_.find(t.volume); it != active_.end()) {
      spdlog::warn("volume {}: new connection from {} replaces the session of {}", t.volume,
                   link->peer(), it->second->peer());
      it->second->Close();
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
      Status st = Unavailable(fmt::format(
          "volume '{}': the previous session did not end within 30 s; try again", t.volume));
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
    if (!active_.count(t.volume)) {
      s.state = "disconnected";
      if (!st.ok()) s.error = st.ToString();
    }
  }
  released_.notify_all();
  if (!st.ok() && st.code() != Code::kAborted) SendError(*link, st);
  return st.code() == Code::kAborted ? OkStatus() : st;
}

Status Sink::Session(Link& link, Target& t) {
  auto latest = t.catalog->Latest(t.volume);
  if (!latest.ok()) return latest.status();
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
  RETURN_IF_ERROR(RecoverSpool(t));
  SetState(t.volume, [&](VolumeStatusInfo& s) {
    s.state = "idle";
    s.pool = t.pool_name;
    s.image = t.image;
    s.peer = link.peer();
    s.last_seq = t.last_seq;
    if (*latest) s.last_point_time_ns = (*latest)->source_time_ns;
    s.error.clear();
  });
  pb::HelloReply reply;
  reply.set_protocol_version(kProtocolVersion);
  reply.set_last_applied_seq(t.last_seq);
  reply.set_last_chain(t.chain.AsBytes());
  reply.set_sink_site(env_.site);
  if (t.partial.records > 0) {
    reply.set_resume_seq(t.partial.seq);
    reply.set_resume_records(t.partial.records);
  }
  RETURN_IF_ERROR(link.Send(FrameType::kHelloReply, reply.SerializeAsString(), {}));
  spdlog::info("volume {}: source {} connected; newest restore point {}", t.volume, link.peer(),
               t.last_seq);

  while (true) {
    auto f = link.Receive(env_.timeouts.idle);
    if (!f.ok()) return f.status();
    const auto t0 = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(EpochSummary sum, ReceiveEpoch(link, t, std::move(f).value()));
    RETURN_IF_ERROR(SendAck(link, sum.seq, pb::EpochAck::DURABLE, sum.chain));
    SetState(t.volume, [&](VolumeStatusInfo& s) { s.state = "applying"; });
    RETURN_IF_ERROR(ApplyAndCommit(t, sum.seq, sum.snap_time_ns));
    RETURN_IF_ERROR(SendAck(link, sum.seq, pb::EpochAck::APPLIED, t.chain));
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    SetState(t.volume, [&](VolumeStatusInfo& s) {
      s.state = "idle";
      s.last_seq = sum.seq;
      s.last_point_time_ns = sum.snap_time_ns;
      s.bytes_total += sum.data_bytes;
      s.epochs_total += 1;
      s.throughput_bps = secs > 0 ? sum.data_bytes / secs : 0;
      s.error.clear();
    });
  }
}

StatusOr<EpochSummary> Sink::ReceiveEpoch(Link& link, Target& t, Frame begin) {
  EpochVerifier verifier(t.volume, t.last_seq, t.chain);
  std::unique_ptr<SpoolWriter> spool;
  std::filesystem::path path;
  uint64_t spooled_records = 0;  // whole Record frames in the spool
  bool at_end = false;           // the failure is the epoch's end
  auto fail = [&](const cairn::Status& st) -> cairn::Status {
    if (st.code() == Code::kDataLoss) {
      std::lock_guard lock(mu_);
      ++corrupt_frames_;
    }
    spdlog::error("volume {}: epoch refused: {}", t.volume, st.message());
    // Keep what was verified and spooled, durably: the source re-sends only
    // the rest. If it cannot be made durable it is worth nothing, and an
    // epoch whose end does not verify as a whole starts over (resuming it
    // would fail the same way every time).
    if (!at_end && spool && spool->Sync().ok() && spooled_records > 0) {
      spdlog::info("volume {}: kept {} verified records of epoch {} for resume", t.volume,
                   spooled_records, verifier.begin().seq);
    } else if (!path.empty()) {
      spool.reset();
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
    return st;
  };

  auto step = verifier.Check(begin);
  if (!step.ok()) return fail(step.status());
  if (*step != EpochVerifier::Step::kBegin) return fail(DataLoss("epoch does not start with EpochBegin"));
  const EpochSummary announced = verifier.begin();
  path = t.SpoolPath(announced.seq);
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
    if (!w.ok()) return fail(w.status());
    spool = std::move(w).value();
    spooled_records = t.partial.records;
  } else {
    auto w = SpoolWriter::Create(path, SpoolIdentity{t.volume, announced.seq}, env_.spool);
    if (!w.ok()) return fail(w.status());
    spool = std::move(w).value();
    const auto header = EncodeHeader(begin.type, begin.body, 0);
    if (Status st = spool->Append(header, begin.body, {}); !st.ok()) return fail(st);
  }
  t.partial = {};
  SetState(t.volume, [&](VolumeStatusInfo& s) { s.state = "receiving"; });
  while (true) {
    auto next = link.Receive(env_.timeouts.stall);
    if (!next.ok()) return fail(next.status());
    const Frame& f = *next;
    at_end = f.type == FrameType::kEpochEnd;
    step = verifier.Check(f);
    if (!step.ok()) return fail(step.status());
    if (*step == EpochVerifier::Step::kBegin) return fail(DataLoss("EpochBegin inside an epoch"));
    const auto header = EncodeHeader(f.type, f.body, static_cast<uint32_t>(f.payload.size()));
    if (Status st = spool->Append(header, f.body, f.payload); !st.ok()) return fail(st);
    if (*step == EpochVerifier::Step::kEnd) break;
    ++spooled_records;
  }
  at_end = true;
  auto synced = spool->Sync();
  if (!synced.ok()) return fail(synced.status());
  return verifier.summary();
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

Status Sink::ApplyAndCommit(Target& t, uint64_t seq, int64_t) {
  const auto path = t.SpoolPath(seq);
  ASSIGN_OR_RETURN(auto reader, SpoolReader::Open(path, SpoolIdentity{t.volume, seq}));
  EpochVerifier verifier(t.volume, t.last_seq, t.chain);

  // Never write over an image this volume did not create.
  ASSIGN_OR_RETURN(bool exists, t.pool->Exists(t.image));
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
  ASSIGN_OR_RETURN(auto vol, t.pool->Open(t.image));
  if (t.last_seq > 0) {
    ASSIGN_OR_RETURN(auto before, vol->ListSnaps());
    const std::string base = SnapName(t.last_seq);
    if (std::none_of(before.begin(), before.end(), [&](const SnapInfo& s) { return s.name == base; })) {
      return FailedPrecondition(fmt::format(
          "standby image {}/{} has no snapshot {} although the catalog lists it as restore point "
          "{}: it was removed outside Cairn; a full resync is needed",
          t.pool_name, t.image, base, t.last_seq));
    }
  }
  ASSIGN_OR_RETURN(EpochSummary sum, ApplyEpoch(*reader, verifier, *vol, env_.apply, state));

  // A crash after the snapshot but before the catalog leaves the snapshot:
  // it was taken after a complete apply, so it is kept.
  ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
  const std::string snap = SnapName(seq);
  if (std::none_of(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == snap; })) {
    RETURN_IF_ERROR(vol->CreateSnap(snap));
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
  RETURN_IF_ERROR(t.catalog->AddPoint(p));
  t.last_seq = seq;
  t.chain = sum.chain;
  std::error_code ec;
  std::filesystem::remove(path, ec);
  spdlog::info("volume {}: restore point {} made ({} data bytes, {} zero bytes)", t.volume, seq,
               sum.data_bytes, sum.zero_bytes);
  return OkStatus();
}

Status Sink::RecoverSpool(Target& t) {
  std::error_code ec;
  t.partial = {};
  for (const auto& entry : std::filesystem::directory_iterator(t.dir, ec)) {
    const auto name = entry.path().filename().string();
    if (!name.ends_with(".spool")) continue;
    uint64_t seq = 0;
    const std::string stem = name.substr(0, name.size() - 6);
    auto [end, perr] = std::from_chars(stem.data(), stem.data() + stem.size(), seq);
    if (perr != std::errc() || end != stem.data() + stem.size() || seq == 0) continue;
    if (seq != t.last_seq + 1) {
      // Already applied, or not the next epoch: the source re-sends.
      std::filesystem::remove(entry.path(), ec);
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
      if (st.ok()) {
        spdlog::info("volume {}: applied epoch {} from the spool left by a previous run", t.volume,
                     seq);
        continue;
      }
      if (st.code() != Code::kDataLoss) return st;
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
