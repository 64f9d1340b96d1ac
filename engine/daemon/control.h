// The control API: protobuf requests (proto/cairn.proto ControlRequest)
// over cairnd's local socket, one request and one reply per frame. Used by
// the `cairn` CLI and by the Cinder driver shim.
//
// Thread-safety: HandleControl may run on many threads at once if the
// service is thread-safe.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/catalog/catalog.h"
#include "engine/format/frame.h"
#include "engine/link/link.h"
#include "engine/replication/group_source.h"
#include "engine/replication/replication.h"
#include "engine/replication/sink.h"

namespace cairn {

// A volume registered at run time (the Cinder shim), replicated with the
// [source] settings.
struct Registration {
  std::string volume;
  std::string pool;
  std::string image;
  std::string target_pool;   // empty: pool
  std::string target_image;  // empty: image + ".standby"
  // A member of this consistency group (the RBD group of that name in
  // `pool`, which must hold the image); empty: none.
  std::string group;
  // Its own retention at the sink; none: [source] keep_points and
  // retention (none there: the sink's). A group's members share theirs.
  std::optional<RetentionRules> retention;
  // Tiers of its snapshots kept at the source; empty: [source]'s.
  std::vector<RetentionTier> snapshot_tiers;
};

// What cairnd offers on its control socket.
class ControlService {
 public:
  virtual ~ControlService() = default;
  // All volumes if `volume` is empty; kNotFound if a named volume is unknown.
  virtual StatusOr<std::vector<VolumeStatusInfo>> VolumeStatus(const std::string& volume) = 0;
  virtual StatusOr<std::vector<RestorePoint>> Points(const std::string& volume) = 0;
  virtual StatusOr<RestoreResult> Restore(const std::string& volume, uint64_t seq,
                                          const std::string& to_image, bool full, bool force) = 0;
  // Source side: starts a verify of restore point `seq` (0: the newest);
  // returns its id and the point (SourceReplicator::StartVerify).
  struct VerifyStarted {
    uint64_t id = 0;
    uint64_t seq = 0;
  };
  virtual StatusOr<VerifyStarted> Verify(const std::string& volume, uint64_t seq, bool repair) = 0;
  // Standby side: drills (Sink::DrillStart, DrillStop).
  virtual StatusOr<DrillResult> DrillStart(const std::string& volume, uint64_t seq,
                                           const std::string& image) = 0;
  virtual StatusOr<std::vector<std::string>> DrillStop(const std::string& volume,
                                                       const std::string& image) = 0;
  // Starts an epoch now; returns the seq of the point that will hold every
  // write made before the call.
  virtual StatusOr<uint64_t> Replicate(const std::string& volume) = 0;
  // Source side: replicate a volume from now on (persisted in RADOS).
  virtual StatusOr<VolumeStatusInfo> Register(const Registration& r) = 0;
  // The members of one consistency group, all or none, their group started
  // once. By default: Register, one by one.
  virtual StatusOr<std::vector<VolumeStatusInfo>> RegisterMany(
      const std::vector<Registration>& rs) {
    std::vector<VolumeStatusInfo> out;
    for (const auto& r : rs) {
      ASSIGN_OR_RETURN(VolumeStatusInfo s, Register(r));
      out.push_back(std::move(s));
    }
    return out;
  }
  virtual Status Unregister(const std::string& volume, bool remove_snapshots) = 0;
  // Standby side: failover / failback of one volume (Sink::Promote/Release).
  virtual StatusOr<PromoteResult> Promote(const std::string& volume, uint64_t seq,
                                          const std::string& pool, const std::string& to_image) = 0;
  virtual StatusOr<std::string> Release(const std::string& volume) = 0;
  // Standby side: the operator's choice in a split brain (ResolveRequest).
  struct Resolved {
    std::string kept_as;
    std::string outcome;
  };
  virtual StatusOr<Resolved> Resolve(const std::string& volume, const std::string& keep_site) = 0;
  // Standby side, planned failback of a volume failed over here and
  // replicating back (FailbackRequest).
  struct FailedBack {
    uint64_t seq = 0;
    std::string primary_site;
    std::string kept_as;
    uint64_t copied_bytes = 0;
  };
  virtual StatusOr<FailedBack> Failback(const std::string& volume, uint64_t seq) = 0;
  // Consistency groups (GroupRequest): the source's groups ("" = all),
  // an instant now, and at the standby the group points and a restore of
  // one (Sink::GroupPoints, RestoreGroup).
  virtual StatusOr<std::vector<GroupStatusInfo>> GroupStatus(const std::string& group) = 0;
  virtual StatusOr<uint64_t> ReplicateGroup(const std::string& group) = 0;
  virtual StatusOr<std::vector<GroupPoint>> GroupPoints(const std::string& group) = 0;
  virtual StatusOr<std::vector<RestoreResult>> RestoreGroup(const std::string& group, uint64_t seq,
                                                            const std::string& suffix, bool full,
                                                            bool force) = 0;
  // The images made (or, stop: removed), as pool/image; and the point.
  struct GroupImages {
    uint64_t seq = 0;
    std::vector<std::string> images;
  };
  virtual StatusOr<GroupImages> DrillGroup(const std::string& group, uint64_t seq, bool stop) = 0;
  virtual StatusOr<GroupImages> PromoteGroup(const std::string& group, uint64_t seq,
                                             const std::string& suffix) = 0;
  // Standby side: the members of `group` failed over here replicate back
  // as one group (GroupRequest REPLICATE_BACK); each of `back` names a
  // volume and its image at home (target_pool, target_image).
  virtual StatusOr<std::vector<VolumeStatusInfo>> ReplicateGroupBack(
      const std::string& group, const std::vector<Registration>& back) {
    (void)back;
    return FailedPrecondition("replicating group " + group + " back is not offered here");
  }
  // Standby side: planned failback of every member at group point `seq`
  // (GroupRequest FAILBACK); `images`: the promoted images as kept.
  struct GroupFailedBack {
    uint64_t seq = 0;
    std::string primary_site;
    std::vector<std::string> images;
  };
  virtual StatusOr<GroupFailedBack> FailbackGroup(const std::string& group, uint64_t seq) {
    (void)seq;
    return FailedPrecondition("failing group " + group + " back is not offered here");
  }
};

// Who sent a control request, and what they may do: every caller may read
// (status, points); only an admin may change anything (replicate, restore,
// register, unregister, promote, release, resolve, failback).
struct ControlCaller {
  bool admin = false;
  std::string who;  // for the log: "pid 123 uid 0 (root)"
};

// Whether the process `c` may change: root, cairnd's own user, or a member
// of `admin_gid` (its primary group, or a supplementary one in the user
// database).
ControlCaller CallerOf(const PeerCredentials& c, std::optional<uint32_t> admin_gid);

// Decodes a ControlRequest frame, runs it, returns the ControlReply body.
// A malformed request gets a reply with kInvalidArgument, never a crash; a
// changing request from a caller that is not an admin gets
// kPermissionDenied and runs nothing. Changing requests are logged with
// their caller.
std::string HandleControl(ControlService& service, const Frame& request,
                          const ControlCaller& caller);

}  // namespace cairn
