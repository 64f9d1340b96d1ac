// Sink: the standby site's operations on restore points: list, restore,
// drills, promote (fail over) and release.

#include <fcntl.h>
#include <fmt/chrono.h>
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

// Restore point `seq` of `volume`, or its newest if `seq` is 0.
StatusOr<RestorePoint> PointOrNewest(Catalog& catalog, const std::string& volume, uint64_t seq) {
  if (seq != 0) return catalog.Get(volume, seq);
  ASSIGN_OR_RETURN(auto latest, catalog.Latest(volume));
  if (!latest) return NotFound(fmt::format("volume '{}' has no restore point", volume));
  return *latest;
}

// kFailedPrecondition if a verify found `p` differs from its source;
// `instead` tells the operator what to do.
Status RefuseDiffering(const RestorePoint& p, std::string_view instead) {
  const auto& v = p.verification;
  if (!v || v->mismatched_grains == 0) return OkStatus();
  return FailedPrecondition(fmt::format(
      "restore point {} of volume '{}' differs from its source in {} grains of {} bytes (found by "
      "a verify at {:%Y-%m-%dT%H:%M:%SZ}): {}",
      p.epoch.seq, p.epoch.volume, v->mismatched_grains, v->grain,
      fmt::gmtime(static_cast<time_t>(v->recorded_ns / 1'000'000'000)), instead));
}

// Clones point `p` into `to_image` in `pool` (unless a clone is there
// already) and snapshots it as cairn.<seq>: the promoted image can then
// replicate back (failback) as a delta from that point.
Status ClonePromoted(Pool& pool, const RestorePoint& p, const std::string& to_image) {
  ASSIGN_OR_RETURN(bool exists, pool.Exists(to_image));
  if (!exists) RETURN_IF_ERROR(pool.Clone(p.image, p.snap, to_image));
  ASSIGN_OR_RETURN(auto vol, pool.Open(to_image));
  ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
  const std::string name = SnapName(p.epoch.seq);
  if (std::none_of(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == name; })) {
    // Before anyone writes it: nobody else has it open yet (or, promoted
    // again after a crash, the snapshot comes after such writes; replicating
    // back then starts over from a full copy rather than miss them).
    if (!exists) RETURN_IF_ERROR(vol->CreateSnap(name, Volume::Writers::kThisProcessOnly));
  }
  return OkStatus();
}

}  // namespace

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
                                      const std::string& pool_hint, const std::string& to_image) {
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
    RETURN_IF_ERROR(ClonePromoted(*pool, point, to_image));  // a crash after the fence
    return PromoteResult{pool_name, to_image, point, true};
  }
  ASSIGN_OR_RETURN(RestorePoint point, PointOrNewest(catalog, volume, seq));
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
  RETURN_IF_ERROR(catalog.SetPromotion(volume, {point.epoch.seq, pool_name, to_image}));
  {
    std::lock_guard lock(mu_);
    if (auto it = active_.find(volume); it != active_.end() && it->second != nullptr) {
      it->second->Close();
    }
  }
  if (Status st = ClonePromoted(*pool, point, to_image); !st.ok()) {
    (void)catalog.ClearPromotion(volume);
    return st.Annotate(fmt::format("promoting restore point {} of '{}'", point.epoch.seq, volume));
  }
  spdlog::warn(
      "volume {}: FAILED OVER to site {}: restore point {} (source time {} ns) promoted "
      "into {}/{}; its source is refused until it is released",
      volume, env_.site, point.epoch.seq, point.epoch.snap_time_ns, pool_name, to_image);
  if (const auto& v = point.verification; v && v->mismatched_grains > 0) {
    // At a disaster the operator chooses; the log says what a verify found.
    spdlog::error(
        "volume {}: the promoted restore point {} differs from its source in {} grains (cairn "
        "verify): check the data, or promote another point",
        volume, point.epoch.seq, v->mismatched_grains);
  }
  return PromoteResult{pool_name, to_image, point, false};
}

StatusOr<std::string> Sink::Release(const std::string& volume) {
  ASSIGN_OR_RETURN(std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(auto promoted, catalog.GetPromotion(volume));
  if (!promoted) {
    return FailedPrecondition(fmt::format(
        "volume '{}' is not failed over at site {}: nothing to release", volume, env_.site));
  }
  ASSIGN_OR_RETURN(auto pool, env_.open_pool(promoted->pool));
  std::string kept;
  ASSIGN_OR_RETURN(bool exists, pool->Exists(promoted->image));
  if (exists) {
    // Kept, never deleted: it may hold writes made here while failed over.
    kept = fmt::format("{}.failback-{}", promoted->image, UtcStamp(env_.clock->UnixNs()));
    RETURN_IF_ERROR(pool->Rename(promoted->image, kept));
  }
  RETURN_IF_ERROR(catalog.ClearPromotion(volume));
  spdlog::warn("volume {}: released at site {} (failback); the promoted image {}/{} is kept as {}",
               volume, env_.site, promoted->pool, promoted->image,
               kept.empty() ? "(it was removed)" : kept);
  return kept;
}

StatusOr<std::string> Sink::KeepPromoted(const std::string& volume, const std::string& site) {
  ASSIGN_OR_RETURN(std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(auto promoted, catalog.GetPromotion(volume));
  if (!promoted) {
    return FailedPrecondition(fmt::format(
        "volume '{}' is not failed over at site {}: there is no split brain to resolve here",
        volume, env_.site));
  }
  RETURN_IF_ERROR(catalog.SetResolution(volume, site));
  spdlog::warn(
      "volume {}: split brain resolved for site {}: {}/{} replicates back; the old primary keeps "
      "its own writes since restore point {} as a snapshot",
      volume, site, promoted->pool, promoted->image, promoted->seq);
  return pool_name;
}

StatusOr<RestoreResult> Sink::Restore(const std::string& volume, uint64_t seq,
                                      const std::string& to_image, bool full,
                                      const ProgressFn& progress, bool force) {
  if (to_image.empty()) return InvalidArgument("no image name to restore to");
  ASSIGN_OR_RETURN(std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(RestorePoint point, PointOrNewest(catalog, volume, seq));
  // Held against retention while it is copied (a full copy takes a
  // while); read again once held, so one removed in between shows.
  PointHold hold(mu_, verifying_, volume, point.epoch.seq);
  ASSIGN_OR_RETURN(point, catalog.Get(volume, point.epoch.seq));
  if (!force) {
    RETURN_IF_ERROR(RefuseDiffering(point,
                                    "restore a later point (one made after `cairn verify "
                                    "--repair`), or pass --force to restore it anyway"));
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
  spdlog::info("volume {}: restore point {} restored to {}/{} ({})", volume, point.epoch.seq,
               pool_name, to_image, full ? "full copy" : "clone");
  return RestoreResult{pool_name, to_image, point, full ? "full" : "clone"};
}

// Drills: a point cloned into an image of its own while the volume
// replicates on, held against retention (a catalog hold, taken before the
// clone) until the drill stops, which removes the clone and the hold.

StatusOr<DrillResult> Sink::DrillStart(const std::string& volume, uint64_t seq,
                                       const std::string& to_image) {
  ASSIGN_OR_RETURN(const std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(const RestorePoint point, PointOrNewest(catalog, volume, seq));
  RETURN_IF_ERROR(RefuseDiffering(point, "drill another"));
  const std::string image =
      to_image.empty() ? fmt::format("{}-drill-{}", point.image, point.epoch.seq) : to_image;
  ASSIGN_OR_RETURN(auto pool, env_.open_pool(pool_name));
  ASSIGN_OR_RETURN(const bool exists, pool->Exists(image));
  if (exists) {
    return AlreadyExists(
        fmt::format("image {}/{} already exists: stop that drill first, or "
                    "choose another name with --to",
                    pool_name, image));
  }
  // Held first: retention between the clone and the hold would remove the
  // point under the clone.
  RETURN_IF_ERROR(catalog.AddHold(volume, point.epoch.seq, image));
  if (Status st = pool->Clone(point.image, point.snap, image); !st.ok()) {
    (void)catalog.RemoveHold(volume, point.epoch.seq, image);
    return st;
  }
  spdlog::info("volume {}: drill of restore point {} started as {}/{} (held against retention)",
               volume, point.epoch.seq, pool_name, image);
  return DrillResult{pool_name, image, point};
}

StatusOr<std::vector<std::string>> Sink::DrillStop(const std::string& volume,
                                                   const std::string& image) {
  ASSIGN_OR_RETURN(const std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  ASSIGN_OR_RETURN(const auto holds, catalog.Holds(volume));
  ASSIGN_OR_RETURN(auto pool, env_.open_pool(pool_name));
  std::vector<std::string> removed;
  for (const auto& [seq, held] : holds) {
    if (!image.empty() && held != image) continue;
    if (Status st = pool->Remove(held); !st.ok() && st.code() != Code::kNotFound) {
      return st.Annotate(fmt::format("removing drill image {}/{}", pool_name, held));
    }
    RETURN_IF_ERROR(catalog.RemoveHold(volume, seq, held));
    spdlog::info("volume {}: drill {}/{} of restore point {} stopped; the point is no longer held",
                 volume, pool_name, held, seq);
    removed.push_back(held);
  }
  if (removed.empty()) {
    return NotFound(image.empty() ? fmt::format("volume '{}' has no drill", volume)
                                  : fmt::format("volume '{}' has no drill {}", volume, image));
  }
  return removed;
}

}  // namespace cairn
