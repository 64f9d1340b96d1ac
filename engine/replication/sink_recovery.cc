// Sink: what a spool left by a cut or a crash holds, and the retries that
// apply durable epochs whose apply failed.

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <ctime>
#include <future>
#include <system_error>

#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {

namespace {

// The spool as a log line names it (FileSpoolStore: its path).
std::string SpoolName(const SpoolStore& spools, const std::string& volume, uint64_t seq) {
  return (std::filesystem::path(spools.where()) / volume / fmt::format("{}.spool", seq)).string();
}

}  // namespace

StatusOr<bool> Sink::ForgetLostPoints(Target& t) {
  if (t.last_seq == 0) return false;
  auto vol = t.pool->Open(t.image);
  if (vol.status().code() == Code::kNotFound) return false;  // PrepareTarget says so
  RETURN_IF_ERROR(vol.status());
  ASSIGN_OR_RETURN(const auto snaps, (*vol)->ListSnaps());
  ASSIGN_OR_RETURN(const auto points, t.catalog->Points(t.volume));
  size_t forgot = 0;
  for (auto p = points.rbegin(); p != points.rend(); ++p) {
    if (p->image != t.image) break;
    const bool there = std::any_of(snaps.begin(), snaps.end(),
                                   [&](const SnapInfo& s) { return s.name == p->snap; });
    if (there) break;
    RETURN_IF_ERROR(t.catalog->RemovePoint(t.volume, p->epoch.seq));
    spdlog::error(
        "volume {}: restore point {} is forgotten: its snapshot {}/{}@{} was removed outside "
        "Cairn",
        t.volume, p->epoch.seq, t.pool_name, t.image, p->snap);
    ++forgot;
  }
  if (forgot == 0) return false;
  t.last_seq = 0;
  t.chain = ChainDigest();
  if (forgot == points.size()) {
    // No point is left to say what the head holds: it is kept as it is, as
    // a resync base, and the first epoch compares the whole image with it by
    // digests (only what differs is written), as for an image adopted
    // without a point.
    const std::string kept = "cairn-divergent-" + UtcStamp(env_.clock->UnixNs());
    RETURN_IF_ERROR((*vol)->CreateSnap(kept));
    spdlog::warn(
        "volume {}: no restore point is left on {}/{}: its head is kept as {} and the "
        "next epoch resyncs by block digests against it",
        t.volume, t.pool_name, t.image, kept);
  }
  return true;
}

Sink::SpoolScan Sink::ScanSpool(const Target& t, uint64_t seq, uint64_t until) {
  SpoolScan scan(EpochVerifier(t.volume, t.last_seq, t.chain));
  auto reader = env_.spools->Open(t.volume, seq);
  if (!reader.ok()) {
    scan.opened = reader.status();
    return scan;
  }
  while (scan.end < until && !scan.complete) {
    auto f = (*reader)->Next();
    if (!f.ok() || !scan.verifier.Check(*f).ok()) break;
    scan.end = (*reader)->offset();
    scan.complete = scan.verifier.done();
  }
  if (scan.verifier.begin().id.seq == seq) scan.records = scan.verifier.begin().records;
  return scan;
}

uint64_t Sink::VerifiedRecords(const Target& t, uint64_t seq) { return ScanSpool(t, seq).records; }

Status Sink::ReplayPrefix(Target& t, EpochVerifier& verifier) {
  SpoolScan scan = ScanSpool(t, t.partial.seq, t.partial.offset);
  RETURN_IF_ERROR(scan.opened);
  if (scan.end != t.partial.offset || scan.records != t.partial.records) {
    return DataLoss(fmt::format("spool of epoch {} changed since it was scanned", t.partial.seq));
  }
  verifier = std::move(scan.verifier);
  return OkStatus();
}

Status Sink::RecoverSpool(Target& t) {
  t.partial = {};
  // Epochs need not be numbered without gaps (snapshots taken during an
  // outage may be dropped unshipped), but only one is in flight at a time:
  // the lowest seq after the newest point. Any other spool is stale.
  StatusOr<std::vector<uint64_t>> listed = env_.spools->List(t.volume);
  if (!listed.ok()) {
    spdlog::warn("volume {}: {}", t.volume, listed.status().message());
    return OkStatus();  // nothing found: the source re-sends
  }
  const std::vector<uint64_t>& spools = *listed;
  const auto next = std::upper_bound(spools.begin(), spools.end(), t.last_seq);
  for (const uint64_t seq : spools) {
    if (seq <= t.last_seq || t.partial.seq != 0 || seq != *next) {
      // Already applied, or not the next epoch: the source re-sends.
      spdlog::info("volume {}: removing stale spool {}", t.volume,
                   SpoolName(*env_.spools, t.volume, seq));
      (void)env_.spools->Remove(t.volume, seq);
      continue;
    }
    // Scan: how much of the epoch is there and verifies?
    const SpoolScan scan = ScanSpool(t, seq);
    if (scan.complete) {
      Status st = ApplyAndCommit(t, seq);
      PruneCommitted(t);
      if (st.ok()) {
        spdlog::info(
            "volume {}: applied epoch {} from the spool (durable since an earlier "
            "session or run)",
            t.volume, seq);
        continue;
      }
      if (st.code() != Code::kDataLoss) {
        return ClusterError(t, st, fmt::format("applying spooled epoch {}", seq));
      }
      t.durable_seq = 0;
      spdlog::warn("volume {}: discarding spool of epoch {}: {}", t.volume, seq, st.message());
      (void)env_.spools->Remove(t.volume, seq);
    } else if (scan.records > 0) {
      t.partial = {seq, scan.records, scan.end};
      spdlog::info("volume {}: {} verified records of epoch {} are spooled; the source may resume",
                   t.volume, t.partial.records, seq);
    } else {
      (void)env_.spools->Remove(t.volume, seq);
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
  if (t.rules) p.rules = t.rules;
  p.backoff = p.backoff.count() == 0 ? env_.retry_min : std::min(p.backoff * 2, env_.retry_max);
  p.next = env_.clock->Now() + p.backoff;
  const Status out(
      st.code(),
      fmt::format("{}; {} is durable in the spool and the sink applies it by itself "
                  "as soon as it can (retrying with backoff)",
                  st.message(), p.seq != 0 ? fmt::format("epoch {}", p.seq) : "an epoch"));
  p.error = out;
  VolumeStatusInfo& s = status_[volume];
  s.volume = volume;
  s.role = "sink";
  s.state = VolumeState::kError;
  s.error = out.ToString();
  return out;
}

void Sink::RetryLoop() {
  {
    // Complete spools a previous run left: applied without waiting for
    // their sources (which may be gone for good: a lost primary site).
    StatusOr<std::vector<std::string>> found = env_.spools->Volumes();
    if (!found.ok()) spdlog::warn("sink: {}", found.status().message());
    std::lock_guard lock(mu_);
    for (const auto& v : found.ok() ? *found : std::vector<std::string>{}) {
      if (!ValidateVolumeId(v).ok()) continue;
      if (!pending_.count(v)) pending_[v].next = env_.clock->Now();
    }
  }
  std::unique_lock lock(mu_);
  std::map<std::string, std::string> logged;  // volume -> last error logged
  while (!stopping_) {
    const auto now = env_.clock->Now();
    auto wake = Clock::kForever;
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
      env_.clock->WaitUntil(lock, retry_cv_, wake);
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
  t.pool_name = p.pool;
  t.image = p.image;
  t.rules = p.rules;
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
    t.last_seq = (*latest)->epoch.seq;
    t.chain = (*latest)->chain_digest;
    t.source_site = (*latest)->epoch.source_site;
    if (t.image.empty()) t.image = (*latest)->image;
  }
  if (t.image.empty()) return OkStatus();  // no point yet: its source names the image
  const uint64_t before = t.last_seq;
  RETURN_IF_ERROR(RecoverSpool(t));
  if (t.last_seq > before) {
    spdlog::info(
        "volume {}: restore point {} made from the spool by the sink itself (no source "
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

}  // namespace cairn
