// Sink: the standby role. Receives epochs from sources, verifies every
// frame, spools them durably, acknowledges, applies them to the standby
// images, snapshots each as a restore point and records it in the catalog.
//
// Per epoch, in order:
//   1. frames arrive; each is verified (EpochVerifier) before it is
//      appended to the spool of (volume, seq) in SinkEnv::spools and, at
//      once, written to the head of the standby image (ApplyStream: the
//      apply overlaps the receive). The head is the sink's staging area,
//      never a restore point;
//   2. at EpochEnd: Sync (fdatasync) -> EpochAck DURABLE;
//   3. wait for the head writes; if they could not all be made (a resumed
//      epoch, a standby write error), replay the spool, verifying again;
//   4. snapshot cairn.<seq> on the standby image: the restore point;
//   5. catalog record (RADOS omap) -> spool removed -> EpochAck APPLIED.
// A crash anywhere leaves either the old newest point or the new one; a
// durable spool not yet applied is applied when the source reconnects.
// A frame that fails verification is never spooled: the sink answers with
// a LinkError and closes, and the source re-sends the epoch.
//
// Outages at the standby site:
//   - the standby Ceph cluster does not answer (every RADOS op gives up
//     after [ceph] op_timeout): the session ends with Unavailable "the
//     standby Ceph cluster of site B (CONF) is unreachable: ...". An epoch
//     already durable in the spool stays there, and the sink itself retries
//     applying it with backoff (SinkEnv::retry_min..retry_max), whether or
//     not its source comes back; meanwhile a source that connects is told
//     so at once. A restarted sink does the same for the complete spools it
//     finds (of volumes that have a restore point, so their image is known).
//   - the spool disk is full, or an epoch would pass SpoolOptions::max_bytes:
//     the epoch is refused with ResourceExhausted, naming the spool
//     directory and what to do; the verified prefix that reached the disk
//     is made durable and kept, and the source resumes after it once there
//     is room.
//
// Thread-safety: Serve may run on many threads at once (one per source
// connection). A new connection for a volume that has one already replaces
// it (the source reconnected after a cut the old session has not noticed
// yet). The sink's own retry thread holds a volume the same way while it
// applies a spooled epoch; a connection for that volume waits for it.
// Report, Points and Restore are safe from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "engine/base/clock.h"
#include "engine/base/memory_budget.h"
#include "engine/catalog/catalog.h"
#include "engine/catalog/kv_store.h"
#include "engine/epoch/epoch.h"
#include "engine/link/link.h"
#include "engine/link/tcp_link.h"
#include "engine/replication/image_gate.h"
#include "engine/replication/peer_grants.h"
#include "engine/replication/replication.h"
#include "engine/replication/retention.h"
#include "engine/spool/spool.h"
#include "engine/spool/spool_store.h"
#include "engine/volume/volume.h"

namespace cairn {
namespace pb {
class Hello;  // proto/cairn.proto
class RestorePoint;
}  // namespace pb

struct SinkEnv {
  std::string site;
  // Where epochs are spooled (cairnd: a FileSpoolStore over [sink]
  // spool_dir). Required; shared with the sink's threads.
  std::shared_ptr<SpoolStore> spools;
  std::vector<std::string> pools;  // pools this sink serves
  std::function<StatusOr<std::shared_ptr<Pool>>(const std::string& pool)> open_pool;
  std::function<StatusOr<std::shared_ptr<KvStore>>(const std::string& pool)> open_catalog;
  // Shared with this process's sources: an image of theirs that this sink
  // takes in reverse (failback) is held while it adopts it. None: no
  // source here.
  std::shared_ptr<ImageGate> gate;
  ApplyOptions apply;
  SpoolOptions spool;
  LinkTimeouts timeouts;
  // Names the standby Ceph cluster in errors (cairnd: its ceph.conf path).
  std::string cluster;
  // Backoff of the sink's own attempts to apply a durable spooled epoch
  // after the standby cluster failed: doubles from retry_min to retry_max.
  std::chrono::milliseconds retry_min{1000};
  std::chrono::milliseconds retry_max{15000};
  // Restore points kept per volume (0: all); see PrunePoints.
  uint32_t keep_points = 0;
  // ... and the newest point of each of the last periods of each tier
  // (retention.h); points any rule keeps are kept.
  std::vector<RetentionTier> retention_tiers;
  // Where an epoch's apply window and spool buffers come from (shared with
  // the daemon's other epochs); none: each takes what `apply` and `spool`
  // say.
  std::shared_ptr<MemoryBudget> budget;
  // What retries, refusals, lag and point times read and wait on (tests:
  // a ManualClock that outlives the sink).
  Clock* clock = &RealClock();
  // Which authenticated sources may write what (peer_grants.h); nullopt:
  // links without TLS, everyone may. A live session of a volume is
  // replaced only by a session of the same peer.
  std::optional<std::vector<PeerGrant>> grants;
};

struct PromoteResult {
  std::string pool;
  std::string image;
  RestorePoint point;
  bool again = false;  // the volume was already promoted so
};

// A drill: a restore point cloned while replication goes on (Sink::DrillStart).
struct DrillResult {
  std::string pool;
  std::string image;
  RestorePoint point;
};

struct RestoreResult {
  std::string pool;
  std::string image;
  RestorePoint point;
  std::string mode;  // "clone" or "full"
};

class Sink {
 public:
  // Starts the retry thread, which first looks for complete spools left by
  // a previous run (see above).
  explicit Sink(SinkEnv env);
  // Stops the retry thread (after its attempt in progress, if any).
  ~Sink();
  Sink(const Sink&) = delete;
  Sink& operator=(const Sink&) = delete;

  // Serves one source connection until it closes or fails. Returns OK when
  // the source hung up cleanly.
  Status Serve(Link& link);

  std::vector<VolumeStatusInfo> Report() const;
  StatusOr<std::vector<RestorePoint>> Points(const std::string& volume);
  // seq 0: the newest point. kAlreadyExists if `to_image` exists;
  // kFailedPrecondition if a verify found the point differs from its
  // source, unless `force`.
  StatusOr<RestoreResult> Restore(const std::string& volume, uint64_t seq,
                                  const std::string& to_image, bool full,
                                  const ProgressFn& progress, bool force = false);
  // Consistency groups (sink_group.cc). The group points of `group`,
  // oldest first (from whichever served pool holds them).
  StatusOr<std::vector<GroupPoint>> GroupPoints(const std::string& group);
  // Restores every member of group point `seq` (0: the newest) at once:
  // member M's point into <M's standby image>-<suffix> (suffix "" =
  // "restore-<seq>"). All or nothing: if one member cannot be restored,
  // those restored are removed and the error returned.
  StatusOr<std::vector<RestoreResult>> RestoreGroup(const std::string& group, uint64_t seq,
                                                    const std::string& suffix, bool full,
                                                    bool force);
  // A drill of every member at group point `seq` (0: the newest), all or
  // nothing (DrillStart per member, default clone names).
  StatusOr<std::vector<DrillResult>> DrillGroup(const std::string& group, uint64_t seq);
  // Stops every drill of the group's members; returns the images removed.
  StatusOr<std::vector<std::string>> StopGroupDrills(const std::string& group);
  // Failover of a whole group at one point: every member's point `seq` (0:
  // the newest group point) promoted into <member's standby image>-<suffix>
  // ("" = "failover"). All or nothing: if one member cannot be promoted,
  // those promoted are released again (their images kept, as Release does).
  StatusOr<std::vector<PromoteResult>> PromoteGroup(const std::string& group, uint64_t seq,
                                                    const std::string& suffix);
  // A non-disruptive drill (sink_drill.cc): clones restore point `seq` (0:
  // the newest) of `volume` into `to_image` ("" = <standby image>-drill-<seq>)
  // while replication goes on, and holds the point against retention
  // (Catalog::AddHold) until DrillStop. kAlreadyExists if the image exists;
  // kFailedPrecondition for a point a verify found differs.
  StatusOr<DrillResult> DrillStart(const std::string& volume, uint64_t seq,
                                   const std::string& to_image);
  // Removes the drill image `image` of `volume` ("" = all of its drills)
  // and lifts its hold; returns the images removed. kNotFound if there is
  // no such drill.
  StatusOr<std::vector<std::string>> DrillStop(const std::string& volume, const std::string& image);
  // Failover of one volume: fences it (its source is refused from now on)
  // and clones restore point `seq` (0: the newest) into pool/to_image. The
  // same call again returns the same promotion (again = true); another
  // image or point while promoted is kFailedPrecondition; an existing
  // to_image is kAlreadyExists (never overwritten).
  StatusOr<PromoteResult> Promote(const std::string& volume, uint64_t seq, const std::string& pool,
                                  const std::string& to_image);
  // Failback: lifts the fence. The promoted image is renamed
  // <image>.failback-<UTC time>, never deleted; returns that name ("" if
  // the image was gone).
  StatusOr<std::string> Release(const std::string& volume);
  // A split brain of a volume promoted here is resolved for this site
  // (`site`): its source's Hellos say so from now on. Returns the pool of
  // the promotion. FailedPrecondition if the volume is not promoted here.
  StatusOr<std::string> KeepPromoted(const std::string& volume, const std::string& site);
  // Planned failback, at the site a volume failed over to, once its
  // source here replicated restore point `seq` of the promoted image back
  // and the other site (`home`) took the image back (Hello.hand_back_seq,
  // SourceReplicator::HandBack): copies
  // what the promoted image changed from its promotion point to its
  // cairn.<seq> into the standby image, each block read back and checked
  // by hash, makes it restore point `seq` from home.site, with home's
  // chain and the time of home's own snapshot of it (so that site's
  // source resumes with a delta from it), then releases the
  // volume. FailedPrecondition, changing nothing, if the volume is not
  // promoted here or its standby image moved past the promotion point
  // (promoted from an older point: then release it, and the other site
  // resends what changed since its own newest point there).
  struct FoldedBack {
    std::string kept_as;  // Release's
    uint64_t copied_bytes = 0;
  };
  // `group` (with its `group_members`): the point is that group's instant,
  // so the group point is made here once every member's is.
  StatusOr<FoldedBack> FoldBack(const std::string& volume, uint64_t seq, const HandedBack& home,
                                const std::string& group = "", uint32_t group_members = 0);
  // Frames refused for failing verification, since start.
  uint64_t corrupt_frames() const;

 private:
  struct Target;    // one volume being received
  class Reception;  // one epoch being received (sink_receive.cc)
  // The source's Hello; a peer that is not a Cairn source of this protocol
  // version is told why.
  StatusOr<pb::Hello> ReceiveHello(Link& link);
  // Checks what the Hello names (volume id, pool served, not failed over)
  // and opens its pool, catalog and spool directory into `t`.
  Status OpenTarget(Target& t);
  // The HelloReply of a probe that CheckProbe passed.
  Status AnswerProbe(Link& link, const Target& t);
  // A verify Hello (Hello.verify_seq, sink_verify.cc): answers the digests
  // of t.volume's restore point `seq` from its snapshot, in order from
  // offset 0, then checks the source's VerifyEnd (every grain served, the
  // snapshot still the one read) and records its verdict in the catalog.
  // The point is held against retention meanwhile. No session is replaced.
  Status ServeVerify(Link& link, Target& t, uint64_t seq);
  // The points of `volume` a verify holds now.
  std::set<uint64_t> VerifyingPoints(const std::string& volume) const;
  // Makes `link` the volume's live session: refused while the sink itself
  // retries a spooled epoch or its spool refused the last one; an older
  // session of the volume is closed and waited for (30 s at most).
  Status ClaimVolume(Link& link, const Target& t);
  // Replication in reverse (failback, sink_failback.cc): if this sink has
  // no point of t.volume and t's image holds the source's base point as
  // its own cairn.<seq> snapshot (same time taken), records that point as
  // this sink's, so the next epoch is a delta from it. What the image
  // holds beyond the point (writes since, later cairn.<N> snapshots) is
  // kept as cairn-divergent-<time> snapshots first, never destroyed. If
  // both this image and the source's changed since the point (a split
  // brain), refuses with Reason::kSplitBrain, changing nothing, unless the
  // operator chose the source's side (Hello.keep_source).
  // If the image has no snapshot of the point (pruned, or another image),
  // AdoptWithoutPoint.
  Status AdoptBase(Target& t, const pb::Hello& hello);
  // An adoption where t's image does not hold the source's base point: it
  // cannot tell what this site wrote since (nor whether the image is the
  // volume's), so it refuses unless the operator chose the source's side
  // (keep_source, `cairn resolve`). Then the head and its
  // cairn.<N> snapshots are kept (cairn-divergent-<time>) and t's image
  // becomes the volume's standby with no point: the first epoch is
  // compared by digests with that snapshot (ResyncBaseOf) and writes only
  // what differs. Adopted so before: nothing more. With `share` (the
  // image's share of the group snapshot the point came from) the image is
  // the volume's: no operator is needed unless both sites wrote since.
  Status AdoptWithoutPoint(Target& t, const pb::Hello& hello, const std::string& owner, Volume& vol,
                           const std::vector<SnapInfo>& snaps,
                           const std::optional<SnapInfo>& share);
  // A group member's image here that nothing wrote since its share of the
  // group snapshot the point came from: the head is the point. Its own
  // cairn.<N> (N >= the point: the one taken just before the group's) are
  // kept as cairn-divergent-<time>.cairn.<N>, the head is snapshotted as
  // cairn.<point> and adopted, so the next epoch is a delta, not a resync.
  Status AdoptShare(Target& t, const RestorePoint& base, Volume& vol,
                    const std::vector<SnapInfo>& snaps);
  // An adoption's record: t's image is the volume's (its owner), and
  // `base` is its point there, held by snapshot `snap`.
  Status RecordAdoption(Target& t, const RestorePoint& base, const std::string& snap, int64_t now);
  // A planned failback's Hello (hand_back_seq): t's image is the volume's
  // primary again at this site. Its newest point must be hand_back_seq,
  // on t's image, from t's source site; the head is put back to it if an
  // epoch left writes beyond, and the catalog forgets the volume
  // (Catalog::HandBack). Answers HelloReply with the point and its chain;
  // the same again once done (the image holds the snapshot, nobody owns
  // it).
  Status HandBack(Link& link, Target& t, const pb::Hello& hello);
  // After HandBack: the volume's claim goes, and its status if `handed`
  // (no longer this sink's).
  void EndHandBack(const Target& t, bool handed);
  // A hand-back of point `seq` asked again once done: its snapshot on t's
  // image, which nobody owns; nullopt if it is not so.
  StatusOr<std::optional<SnapInfo>> HandedBackBefore(const Target& t, uint64_t seq);
  // Before an adoption: the image's cairn.<N> snapshots after `seq` are
  // renamed cairn-divergent-<time>.cairn.<N>, and the head, if `divergent`
  // bytes differ from the point, is snapshotted cairn-divergent-<time>.
  Status KeepDivergent(const Target& t, Volume& vol, const std::vector<SnapInfo>& snaps,
                       uint64_t seq, uint64_t divergent, int64_t now);
  // The session of `t` ended with `st` (mu_ held): the status says how,
  // and an epoch left durable is retried. Returns what the source is told.
  Status ReleaseVolumeLocked(const Target& t, Status st);
  Status Session(Link& link, Target& t);
  // An Unchanged frame of t's source: the newest point still holds the
  // image as of its time (status and lag; nothing else changes).
  void NoteUnchanged(const Target& t, const Frame& f, const std::string& peer);
  StatusOr<EpochSummary> ReceiveEpoch(Link& link, Target& t, Frame begin);
  // A session's epochs after its HelloReply, until the link fails.
  Status ServeEpochs(Link& wire, Target& t);
  // Makes durable epoch `seq` restore point `seq`: its records on the
  // standby image (already, if streamed; else replayed from the spool),
  // the snapshot, the catalog record; then the spool goes.
  Status ApplyAndCommit(Target& t, uint64_t seq);
  // Epoch `seq` written to the standby head, and on which image handle.
  struct WrittenEpoch {
    std::unique_ptr<Volume> vol;
    EpochSummary summary;
    std::string phases;  // where its time went, for the log
  };
  StatusOr<WrittenEpoch> WriteEpoch(Target& t, uint64_t seq);
  // The restore point epoch `sum` becomes: a snapshot of t's standby image.
  RestorePoint PointOf(const Target& t, const EpochSummary& sum) const;
  // Unlinks epoch seq's spool on a thread of its own (t.spool_removal).
  void RemoveSpoolBeside(Target& t, uint64_t seq);
  // The standby image of `t`, checked to be the one this volume's points
  // live on (created if the volume has none yet) and open.
  struct PreparedTarget {
    std::unique_ptr<Volume> vol;
    TargetState state = TargetState::kHasData;
  };
  StatusOr<PreparedTarget> PrepareTarget(Target& t);
  // What a probe Hello (cairnd --check at the source) is told: would an
  // epoch of t.volume into t.pool/t.image be taken, spool included.
  Status CheckProbe(Target& t);
  // t has no point and its image was adopted without one: it holds a
  // ResyncBaseOf snapshot the first epoch is compared with.
  StatusOr<bool> HasResyncBase(const Target& t);
  // Which volume t's image is the standby of ("" if none): FailedPrecondition
  // if it is another volume's.
  static StatusOr<std::string> ImageOwnerFor(const Target& t);
  // The volume's newest point from the catalog (into t.last_seq, t.chain);
  // FailedPrecondition if it came from another source site than t's.
  StatusOr<std::optional<RestorePoint>> LoadLatest(Target& t);
  // The apply window of one epoch whose records are at most `max_block`
  // long, no larger than its image (`image_size`), out of env_.budget
  // (waits for one block's worth; kAborted if the sink stops meanwhile);
  // `opt` says how much was had.
  StatusOr<MemoryBudget::Lease> BorrowApplyMemory(uint64_t max_block, uint64_t image_size,
                                                  ApplyOptions* opt);
  // Retention (t.rules, its source's, and the sink's own SinkEnv::keep_points
  // and retention_tiers, which a source's never undercut; none while t.rules
  // is unknown): removes the points of `t` that no rule keeps (PointsToKeep), nor a drill or verify
  // holds, each from the catalog first and then its snapshot on `vol`, so a crash between leaves a
  // stray snapshot (removed by the next pass: every cairn.<N> snapshot below the newest point that
  // is no point kept goes), never a listed point without its data. Best effort: a failure is
  // logged, the new point stands.
  void PrunePoints(Target& t, Volume& vol);
  // Runs `act` on every member's point of group point `seq` (0: the
  // newest), all or nothing: once one fails, `undo` runs for each member
  // done (newest first) and the error is returned. The group point acted on.
  StatusOr<GroupPoint> OnWholeGroup(const std::string& group, uint64_t seq, std::string_view what,
                                    const std::function<Status(const RestorePoint&)>& act,
                                    const std::function<void(const RestorePoint&)>& undo);
  // For a member of a consistency group: its group's rules decide which
  // of its points of the group's instants stay (`keep`, from this member's
  // rules, is changed for those only). Kept: the instants the retention
  // rules keep among the group's whole points, each at the group point's
  // time, so every member keeps the same instants; and the newest whole
  // instant's and newer ones (the other members may still be making
  // theirs). All of them if the group has no whole point yet, or it cannot
  // be read.
  void KeepGroupPoints(Target& t, const std::vector<RestorePoint>& points,
                       std::set<uint64_t>* keep);
  // The instants the retention rules keep among group `group`'s whole
  // points up to `whole` (its newest), computed once per newest whole
  // instant and shared by the members.
  StatusOr<std::set<uint64_t>> GroupInstantsToKeep(Target& t, const std::string& group,
                                                   uint64_t whole);
  // The sink's own rules (SinkEnv::keep_points, retention_tiers).
  RetentionRules SinkRules() const { return {env_.keep_points, env_.retention_tiers}; }
  // The seqs of `points` that `own` (a volume's rules) or the sink's rules
  // keep.
  std::set<uint64_t> KeptByRules(const std::vector<RestorePoint>& points,
                                 const RetentionRules& own) const;
  // PrunePoints on the image ApplyAndCommit left in t.committed, if any.
  void PruneCommitted(Target& t);
  Status RecoverSpool(Target& t);
  // The newest points of t.volume whose snapshot is gone from t's image
  // (removed outside Cairn) are forgotten, so the newest point left is the
  // base the source replicates from (a delta, or a resync by digests if the
  // source lost that snapshot too). If none is left, the head is kept as a
  // cairn-divergent-<time> snapshot and the next epoch resyncs by digests
  // against it. True if any was forgotten (t.last_seq, t.chain reset:
  // LoadLatest again).
  StatusOr<bool> ForgetLostPoints(Target& t);
  // How much of the spool of epoch `seq` of t.volume is whole and verifies,
  // read from its start up to the first frame that does not, up to offset
  // `until`, or to its EpochEnd. The one reading of a spool before apply.
  struct SpoolScan {
    explicit SpoolScan(EpochVerifier v) : verifier(std::move(v)) {}
    EpochVerifier verifier;  // as after the last frame that verified
    uint64_t end = 0;        // spool offset after that frame
    uint64_t records = 0;    // Record frames verified (of epoch `seq`)
    bool complete = false;   // its EpochEnd verified: the epoch is whole
    Status opened;           // why the spool could not be opened, if not
  };
  SpoolScan ScanSpool(const Target& t, uint64_t seq, uint64_t until = UINT64_MAX);
  // Record frames at the start of the spool of epoch `seq` that are whole
  // and verify (as RecoverSpool counts them).
  uint64_t VerifiedRecords(const Target& t, uint64_t seq);
  // Reads the verified prefix of t.partial's spool into `verifier`.
  Status ReplayPrefix(Target& t, EpochVerifier& verifier);
  StatusOr<std::string> FindVolumePool(const std::string& volume);
  void SetState(const std::string& volume, const std::function<void(VolumeStatusInfo&)>& fn);
  // An error of the standby cluster: Unavailable ones name it. Marks the
  // failure as the sink's own (status "error", not "disconnected").
  Status ClusterError(Target& t, const Status& st, std::string_view what);

  // A volume whose durable, complete spooled epoch could not be applied.
  struct Pending {
    std::string pool;  // empty: not known yet (found at start): from the catalog
    std::string image;
    uint64_t seq = 0;  // the epoch (0: not known yet)
    Clock::TimePoint next;
    std::chrono::milliseconds backoff{0};
    Status error;                         // the last attempt's, as sources are told
    std::optional<RetentionRules> rules;  // the last session's (Target::rules)
  };
  // After a failed attempt on `volume` (mu_ held): the next one after backoff.
  // Returns `st` with what the operator is told about the retry.
  Status ScheduleRetryLocked(const std::string& volume, const Target& t, const Status& st);
  void RetryLoop();
  // One attempt: what a session does before its HelloReply, without a source.
  Status RetryApply(const std::string& volume, const Pending& p, Target& t);

  SinkEnv env_;
  mutable std::mutex mu_;
  std::condition_variable released_;
  std::map<std::string, Link*> active_;               // volumes with a live session
  std::map<std::string, std::string> active_images_;  // volume -> its pool/image
  std::map<std::string, VolumeStatusInfo> status_;
  uint64_t corrupt_frames_ = 0;
  std::map<std::string, Pending> pending_;
  // (volume, seq) held against retention by a verify or a restore.
  std::multiset<std::pair<std::string, uint64_t>> verifying_;
  // A volume whose last epoch was refused for want of spool space. Until
  // the disk has 4 MiB more free than then (a quota: until cairnd restarts
  // with another), a source that connects again is refused at its Hello:
  // it reads why (mid-epoch, a source busy sending sees only the connection
  // reset) and sends nothing that cannot be spooled. After `until` (60 s)
  // it may try again anyway.
  struct SpoolRefusal {
    Status error;  // its reason: kSpoolDiskFull (more free space lifts it) or kSpoolQuota
    uint64_t free_bytes = 0;
    Clock::TimePoint until;
  };
  std::map<std::string, SpoolRefusal> spool_refusals_;
  // GroupInstantsToKeep's last answer per "<target pool>/<group>": for
  // which newest whole instant, and the instants kept.
  struct GroupKeep {
    uint64_t whole = 0;
    RetentionRules rules;
    std::set<uint64_t> instants;
  };
  std::map<std::string, GroupKeep> group_keep_;
  std::condition_variable retry_cv_;
  bool stopping_ = false;
  std::thread retrier_;  // last: started once everything above exists
};

}  // namespace cairn
