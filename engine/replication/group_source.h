// GroupSource: the source role for a consistency group, the volumes of one
// application (a database's data and log) whose restore points must hold
// them all at one instant.
//
// Its members are the images of a group of the store (an RBD group at this
// site, managed with `rbd group image add/remove`), each replicated by a
// SourceReplicator of its own (its own link, its own sink session). The
// group takes their snapshots, never they themselves: for instant N it
// takes every member's cairn.<N> and then the group snapshot cairn.<N>
// (Pool::CreateGroupSnap: writes quiesced, all images at once). Each
// member then ships instant N read from the group snapshot, diffed from
// its cairn.<N-1>: that one was taken before the group snapshot N-1, so
// the diff holds every change since that instant (and a few bytes the
// instant held already, sent again). The sink makes the group point N
// once every member's point N is made (Catalog::AddPoint).
//
// The next instant is taken only once every member has made its point of
// the last: an outage of one member's link holds the group's next point
// back (a group point needs every member), and costs one coalesced epoch
// per member when it returns. A member added to the store's group and to
// the configuration joins at the next instant with a full sync of its own;
// the others go on from their points. Until both agree, no instant is
// taken, and the status says which image is missing where.
//
// Thread-safety: Start/Stop/RequestNow/Report from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/base/clock.h"
#include "engine/replication/source.h"
#include "engine/volume/volume.h"

namespace cairn {

class GroupSource {
 public:
  // `group`: the store's group in `pool`; `members`: the replicators of its
  // images (not started yet), whose GroupMembership this sets.
  GroupSource(std::string group, std::shared_ptr<Pool> pool, std::chrono::milliseconds interval,
              std::vector<std::shared_ptr<SourceReplicator>> members);
  ~GroupSource();

  void set_clock(Clock& clock) { clock_ = &clock; }  // before Start

  // Starts the group's schedule (its members are started by the caller).
  void Start();
  void Stop();

  // Asks for an instant now. Returns its seq: a group point that holds
  // every write to a member completed before this call.
  StatusOr<uint64_t> RequestNow();
  // One instant, on the caller's thread (tests; the schedule does the
  // same): takes it and tells every member to ship it.
  StatusOr<uint64_t> TakeInstant();

  GroupStatusInfo Report() const;
  const std::string& name() const { return group_; }

 private:
  void Loop();
  // Whether every member has made its point of the newest instant.
  bool AllPointsMade() const;  // mu_ held
  // Whether any member's image changed since its share of the newest
  // instant (true if that cannot be told).
  bool AnyChanged();
  // The next instant's number: above every instant and failed one, every
  // member's snapshots (listed into `listed`) and its sink's points.
  StatusOr<uint64_t> NextSeq(std::vector<std::vector<SnapInfo>>* listed);
  // The members' images must be the store's group, no more, no less.
  Status CheckMembers();
  // Every member's SnapshotPass, held while the instant is taken; the
  // first refusal if any member may not be snapshotted.
  StatusOr<std::vector<ImageGate::Token>> MemberPasses();
  // Removes group snapshots that no member still has the cairn.<N> of
  // (the members prune those as their points are made).
  void PruneGroupSnaps(const std::vector<std::vector<SnapInfo>>& listed);
  void OnPoint(const std::string& volume, uint64_t seq);

  // What the members' calls hold: this group while it exists.
  struct Self {
    std::shared_mutex mu;
    GroupSource* group = nullptr;
  };
  const std::shared_ptr<Self> self_ = std::make_shared<Self>();
  const std::string group_;
  std::shared_ptr<Pool> pool_;
  const std::chrono::milliseconds interval_;
  std::vector<std::shared_ptr<SourceReplicator>> members_;
  Clock* clock_ = &RealClock();

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::mutex instant_mu_;  // one instant at a time
  uint64_t instant_seq_ = 0;
  uint64_t failed_seq_ = 0;  // the newest instant that could not be taken
  uint64_t taking_seq_ = 0;  // the instant being taken now (0: none)
  uint64_t wanted_seq_ = 0;  // RequestNow's promise
  // The instants this process took (the newest 64): how many members, and
  // when.
  std::map<uint64_t, uint32_t> members_at_;
  std::map<uint64_t, int64_t> taken_at_ns_;
  std::map<std::string, uint64_t> points_;  // member volume -> its newest point (instants)
  GroupStatusInfo status_;
  std::thread thread_;
};

}  // namespace cairn
