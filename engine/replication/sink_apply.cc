// Sink: preparing the standby image, applying an epoch and making it a
// restore point, and retention.

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

#include "engine/replication/retention.h"
#include "engine/replication/sink.h"
#include "engine/replication/sink_target.h"
#include "proto/cairn.pb.h"

namespace cairn {

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
  ASSIGN_OR_RETURN(std::string owner, ImageOwnerFor(t));
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
    return FailedPrecondition(
        fmt::format("image {}/{} exists at this site but was not created by Cairn for volume '{}': "
                    "remove or rename it, or set another target_image",
                    t.pool_name, t.image, t.volume));
  }
  if (!vol) {
    ASSIGN_OR_RETURN(vol, t.pool->Open(t.image));
  }
  if (t.last_seq == 0 && state == TargetState::kHasData) {
    // Adopted without a point: the first epoch, compared with the image as
    // adopted, goes onto exactly that.
    ASSIGN_OR_RETURN(auto snaps, vol->ListSnaps());
    if (auto base = ResyncBaseOf(snaps)) RETURN_IF_ERROR(RevertToPoint(*vol, *base).status());
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
      spdlog::warn(
          "volume {}: standby image {}/{} held {} bytes written since restore point {} "
          "by an epoch that did not complete; they were put back as in the point",
          t.volume, t.pool_name, t.image, reverted, t.last_seq);
    }
  }
  t.head_at_point = false;  // the epoch writes from here on
  return PreparedTarget{std::move(vol), state};
}

StatusOr<MemoryBudget::Lease> Sink::BorrowApplyMemory(uint64_t max_block, uint64_t image_size,
                                                      ApplyOptions* opt) {
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

StatusOr<Sink::WrittenEpoch> Sink::WriteEpoch(Target& t, uint64_t seq) {
  Clock& clock = *env_.clock;
  WrittenEpoch w;
  if (auto streamed = std::move(t.streamed); streamed && streamed->seq == seq) {
    // Received and written at once (Finish ran as the spool synced; again,
    // it only confirms that nothing is left in flight).
    const Status st = streamed->apply->Finish();
    if (st.ok()) {
      w.summary = streamed->summary;
      streamed->apply.reset();
      w.vol = std::move(streamed->vol);
      const Target::ReceiveTimes& r = t.times;
      w.phases = fmt::format(
          "received and written in {:.2f} s: waiting for the source {:.2f} s, verifying {:.2f} s, "
          "spooling {:.2f} s, writing the standby image {:.2f} s, last writes and spool sync "
          "{:.2f} s",
          r.total, r.link, r.verify, r.spool, r.standby, r.tail);
      return w;
    }
    WarnAppliedFromSpool(t.volume, seq, st);
  }
  const auto t_apply = clock.Now();
  ASSIGN_OR_RETURN(auto reader, env_.spools->Open(t.volume, seq));
  EpochVerifier verifier(t.volume, t.last_seq, t.chain);
  ASSIGN_OR_RETURN(PreparedTarget prepared, PrepareTarget(t));
  ApplyOptions opt;
  // Its EpochBegin is not read yet: block and image size unknown.
  ASSIGN_OR_RETURN(MemoryBudget::Lease memory, BorrowApplyMemory(kMaxPayload, UINT64_MAX, &opt));
  ASSIGN_OR_RETURN(w.summary, ApplyEpoch(*reader, verifier, *prepared.vol, opt, prepared.state));
  w.vol = std::move(prepared.vol);
  w.phases = fmt::format("written from the spool {:.2f} s", clock.SecondsSince(t_apply));
  return w;
}

RestorePoint Sink::PointOf(const Target& t, const EpochSummary& sum) const {
  RestorePoint p;
  p.epoch = sum.id;
  p.created_time_ns = env_.clock->UnixNs();
  p.pool = t.pool_name;
  p.image = t.image;
  p.snap = SnapName(sum.id.seq);
  p.data_bytes = sum.data_bytes;
  p.zero_bytes = sum.zero_bytes;
  p.epoch_digest = sum.epoch_digest;
  p.chain_digest = sum.chain;
  return p;
}

void Sink::RemoveSpoolBeside(Target& t, uint64_t seq) {
  // The spool is stale now (RecoverSpool would remove it after a crash).
  // Unlinking a large file takes a while (0.17 s for 1 GiB on ext4): it
  // goes on beside the APPLIED ack and the next epoch, not before them.
  const auto remove_spool = [spools = env_.spools, volume = t.volume, seq] {
    (void)spools->Remove(volume, seq);  // as RecoverSpool would
  };
  try {
    t.spool_removal = std::async(std::launch::async, remove_spool);
  } catch (const std::system_error&) {
    remove_spool();  // no thread to be had: unlink it here
  }
}

Status Sink::ApplyAndCommit(Target& t, uint64_t seq) {
  t.durable_seq = seq;  // until it is a restore point
  ASSIGN_OR_RETURN(WrittenEpoch w, WriteEpoch(t, seq));
  if (w.summary.id.seq != seq || w.summary.id.volume != t.volume) {
    return DataLoss(fmt::format("the spool of epoch {} of {} holds epoch {} of {}", seq, t.volume,
                                w.summary.id.seq, w.summary.id.volume));
  }
  Clock& clock = *env_.clock;
  const auto t_snap = clock.Now();
  // A crash after the snapshot but before the catalog leaves the snapshot:
  // it was taken after a complete apply, so it is kept.
  ASSIGN_OR_RETURN(auto snaps, w.vol->ListSnaps());
  const std::string snap = SnapName(seq);
  if (std::none_of(snaps.begin(), snaps.end(), [&](const SnapInfo& s) { return s.name == snap; })) {
    // The standby image is written by this sink alone: no settling.
    RETURN_IF_ERROR(w.vol->CreateSnap(snap, Volume::Writers::kThisProcessOnly));
  }
  const double snap_secs = clock.SecondsSince(t_snap);
  const auto t_catalog = clock.Now();
  RETURN_IF_ERROR(t.catalog->AddPoint(PointOf(t, w.summary)));
  const double catalog_secs = clock.SecondsSince(t_catalog);
  const EpochSummary& sum = w.summary;
  t.last_seq = seq;
  t.chain = sum.chain;
  t.last_point_time_ns = sum.id.snap_time_ns;
  t.head_at_point = true;
  t.durable_seq = 0;
  RemoveSpoolBeside(t, seq);
  spdlog::info(
      "volume {}: restore point {} made ({} data bytes, {} zero bytes; {}, snapshot "
      "{:.2f} s, catalog {:.2f} s)",
      t.volume, seq, sum.data_bytes, sum.zero_bytes, w.phases, snap_secs, catalog_secs);
  if (t.rules && !KeepsAll(*t.rules) && !KeepsAll(SinkRules())) {
    t.committed = std::move(w.vol);
  }
  return OkStatus();
}

std::set<uint64_t> Sink::KeptByRules(const std::vector<RestorePoint>& points,
                                     const RetentionRules& own) const {
  std::set<uint64_t> keep = PointsToKeep(points, own);
  keep.merge(PointsToKeep(points, SinkRules()));
  return keep;
}

void Sink::PruneCommitted(Target& t) {
  if (auto vol = std::move(t.committed)) PrunePoints(t, *vol);
}

void Sink::PrunePoints(Target& t, Volume& vol) {
  if (!t.rules) return;  // its source has not said yet: its next point prunes
  auto points = t.catalog->Points(t.volume);
  if (!points.ok()) {
    spdlog::warn("volume {}: retention skipped: {}", t.volume, points.status().message());
    return;
  }
  if (points->empty()) return;
  std::set<uint64_t> keep = KeptByRules(*points, *t.rules);
  KeepGroupPoints(t, *points, &keep);
  // A point being verified stays until the verify ends (the next pass
  // drops it), and one a drill holds until the drill stops.
  keep.merge(VerifyingPoints(t.volume));
  for (const auto& p : *points) {
    if (!p.held_by.empty()) keep.insert(p.epoch.seq);
  }
  std::vector<uint64_t> dropped;
  for (const auto& p : *points) {
    if (keep.count(p.epoch.seq)) continue;
    if (Status st = t.catalog->RemovePoint(t.volume, p.epoch.seq); !st.ok()) {
      spdlog::warn("volume {}: retention: removing restore point {} from the catalog: {}", t.volume,
                   p.epoch.seq, st.message());
      return;
    }
    dropped.push_back(p.epoch.seq);
  }
  auto snaps = vol.ListSnaps();
  if (!snaps.ok()) {
    spdlog::warn("volume {}: retention: listing snapshots: {}", t.volume, snaps.status().message());
    return;
  }
  // Every cairn.<N> below the newest point that is no point kept: those of
  // the points dropped, and strays of a pass cut between catalog and
  // snapshot. (One above the newest may be a point being made.)
  const uint64_t newest = points->back().epoch.seq;
  for (const auto& s : *snaps) {
    const auto seq = ParseSnapName(s.name);
    if (!seq || *seq >= newest || keep.count(*seq)) continue;
    if (Status st = vol.RemoveSnap(s.name); !st.ok() && st.code() != Code::kNotFound) {
      spdlog::warn("volume {}: retention: removing snapshot {} (no longer a restore point): {}",
                   t.volume, s.name, st.message());
    }
  }
  if (!dropped.empty()) {
    const std::string rules =
        *t.rules == SinkRules() ? DescribeRetention(*t.rules)
                                : fmt::format("its {}, the sink's {}", DescribeRetention(*t.rules),
                                              DescribeRetention(SinkRules()));
    spdlog::info("volume {}: retention keeps {} restore points ({}): removed {} ({}..{})", t.volume,
                 keep.size(), rules, dropped.size(), dropped.front(), dropped.back());
  }
}

}  // namespace cairn
