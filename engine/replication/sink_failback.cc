// Sink: replication in reverse after a failover (failback). The image
// this sink writes was the volume's primary; it holds, as a snapshot of
// its own, the restore point the source's image was promoted from. That
// point becomes this sink's base: only what changed since flows back.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <ctime>

#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {
std::string UtcStamp(int64_t unix_ns) {
  const std::time_t t = static_cast<std::time_t>(unix_ns / 1'000'000'000);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
  return stamp;
}

StatusOr<std::string> Sink::ImageOwnerFor(const Target& t) {
  ASSIGN_OR_RETURN(std::string owner, t.catalog->ImageOwner(t.pool_name, t.image));
  if (!owner.empty() && owner != t.volume) {
    return FailedPrecondition(fmt::format(
        "image {}/{} is the standby of volume '{}', not of '{}': set another target_image",
        t.pool_name, t.image, owner, t.volume));
  }
  return owner;
}

Status Sink::AdoptBase(Target& t, const pb::Hello& hello) {
  const pb::RestorePoint& m = hello.base_point();
  ASSIGN_OR_RETURN(auto latest, t.catalog->Latest(t.volume));
  if (latest) return OkStatus();  // the volume's points are here: the usual chain
  ASSIGN_OR_RETURN(RestorePoint base, RestorePointFromProto(m, "the base point of the Hello"));
  if (base.epoch.volume != t.volume || base.epoch.seq == 0) {
    return InvalidArgument(fmt::format("the Hello of volume '{}' names base point {} of '{}'",
                                       t.volume, base.epoch.seq, base.epoch.volume));
  }
  RETURN_IF_ERROR(ImageOwnerFor(t).status());
  ASSIGN_OR_RETURN(bool exists, t.pool->Exists(t.image));
  if (!exists) return OkStatus();  // nothing to adopt: a first, full epoch makes it
  ASSIGN_OR_RETURN(auto vol, t.pool->Open(t.image));
  ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
  const std::string name = SnapName(base.epoch.seq);
  auto snap = std::find_if(snaps.begin(), snaps.end(), [&](const SnapInfo& s) {
    return s.name == name && s.time_ns == base.epoch.snap_time_ns;
  });
  if (snap == snaps.end()) {
    return FailedPrecondition(fmt::format(
        "image {}/{} has no snapshot {} taken at {} ns, the restore point {} of volume '{}' the "
        "source's image comes from: it is not the image the volume was replicated from, or "
        "that snapshot is gone; give the source another target_image (a full copy)",
        t.pool_name, t.image, name, base.epoch.snap_time_ns, base.epoch.seq, t.volume));
  }
  const SnapInfo point = *snap;
  ASSIGN_OR_RETURN(const uint64_t divergent, BytesSince(*vol, point));
  if (divergent > 0 && hello.base_written_bytes() > 0 && !hello.keep_source()) {
    return FailedPrecondition(
               fmt::format(
                   "split brain: since restore point {} of volume '{}', site {} changed {} bytes "
                   "of {}/{} and site {} changed {} bytes of its image; nothing moves until you "
                   "choose, at site {}'s cairnd: `cairn resolve {} --keep {}` (site {}'s "
                   "writes are kept here as a snapshot) or `cairn resolve {} --keep {}` (site "
                   "{}'s image is kept aside there and site {} replicates again)",
                   base.epoch.seq, t.volume, env_.site, divergent, t.pool_name, t.image,
                   t.source_site, hello.base_written_bytes(), t.source_site, t.volume,
                   t.source_site, env_.site, t.volume, env_.site, t.source_site, env_.site))
        .WithReason(Reason::kSplitBrain);
  }
  // What the image holds beyond the point is kept, under names no epoch
  // uses: the later snapshots renamed, the head snapshotted.
  const int64_t now = env_.clock->UnixNs();
  const std::string kept = "cairn-divergent-" + UtcStamp(now);
  std::vector<std::string> renamed;
  for (const SnapInfo& s : snaps) {
    const auto seq = ParseSnapName(s.name);
    if (!seq || *seq <= base.epoch.seq) continue;
    RETURN_IF_ERROR(vol->RenameSnap(s.name, kept + "." + s.name));
    renamed.push_back(kept + "." + s.name);
  }
  if (divergent > 0) RETURN_IF_ERROR(vol->CreateSnap(kept));

  RestorePoint adopted = base;
  adopted.pool = t.pool_name;
  adopted.image = t.image;
  adopted.snap = name;
  adopted.created_time_ns = now;
  adopted.epoch.source_site = t.source_site;  // the chain goes on from this source
  RETURN_IF_ERROR(t.catalog->SetImageOwner(t.pool_name, t.image, t.volume));
  RETURN_IF_ERROR(t.catalog->AddPoint(adopted));
  if (divergent > 0 || !renamed.empty()) {
    spdlog::warn(
        "volume {}: {}/{} had {} bytes written since restore point {} and {} later snapshot(s): "
        "kept as snapshot {}{}{} before replication from site {} puts it back to the point",
        t.volume, t.pool_name, t.image, divergent, base.epoch.seq, renamed.size(),
        divergent > 0 ? kept : "(none: the head held the point)", renamed.empty() ? "" : ", ",
        fmt::join(renamed, ", "), t.source_site);
  }
  spdlog::warn(
      "volume {}: replication in reverse from site {}: restore point {} adopted as {}/{}@{} "
      "(taken {} ns), the base of the next epoch",
      t.volume, t.source_site, base.epoch.seq, t.pool_name, t.image, name, point.time_ns);
  return OkStatus();
}

}  // namespace cairn
