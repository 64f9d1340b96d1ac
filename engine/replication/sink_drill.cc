// Sink: non-disruptive drills. A drill clones a restore point into an image
// of its own while the volume replicates on; the point is held against
// retention (a hold in the catalog, taken before the clone) until the drill
// stops, which removes the clone and the hold.
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "engine/replication/sink.h"

namespace cairn {

StatusOr<DrillResult> Sink::DrillStart(const std::string& volume, uint64_t seq,
                                       const std::string& to_image) {
  ASSIGN_OR_RETURN(const std::string pool_name, FindVolumePool(volume));
  ASSIGN_OR_RETURN(auto kv, env_.open_catalog(pool_name));
  Catalog catalog(*kv);
  std::optional<RestorePoint> point;
  if (seq != 0) {
    ASSIGN_OR_RETURN(point, catalog.Get(volume, seq));
  } else {
    ASSIGN_OR_RETURN(point, catalog.Latest(volume));
    if (!point) return NotFound(fmt::format("volume '{}' has no restore point", volume));
  }
  if (const auto& v = point->verification; v && v->mismatched_grains > 0) {
    return FailedPrecondition(fmt::format(
        "restore point {} of volume '{}' differs from its source (cairn verify): drill another",
        point->epoch.seq, volume));
  }
  const std::string image =
      to_image.empty() ? fmt::format("{}-drill-{}", point->image, point->epoch.seq) : to_image;
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
  RETURN_IF_ERROR(catalog.AddHold(volume, point->epoch.seq, image));
  if (Status st = pool->Clone(point->image, point->snap, image); !st.ok()) {
    (void)catalog.RemoveHold(volume, point->epoch.seq, image);
    return st;
  }
  spdlog::info("volume {}: drill of restore point {} started as {}/{} (held against retention)",
               volume, point->epoch.seq, pool_name, image);
  return DrillResult{pool_name, image, *point};
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
