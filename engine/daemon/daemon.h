// Daemon: one cairnd process. Connects to the local Ceph cluster, runs a
// SourceReplicator for every [volume] section, a Sink if [sink] is set, and
// the control socket.
//
// A sink fences the sink instance that ran before it (docs/OPERATIONS.md,
// "Fencing"): at Start, before it serves any source, it blocklists the RADOS
// client that holds the sink lock of each of its pools' catalogs (a cairnd
// killed with -9 otherwise keeps its watches, and the exclusive lock of the
// standby image it was applying to, for the OSD's 30 s watch timeout), then
// takes the locks itself; a clean Stop gives them up.
// A sink that later finds itself fenced by a newer instance stops its whole
// process: it sends itself SIGTERM, which cairnd_main waits for.
//
// Thread-safety: Start/Stop from the main thread; the ControlService
// methods from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/catalog/sink_lock.h"
#include "engine/ceph/rbd_volume.h"
#include "engine/daemon/config.h"
#include "engine/daemon/control.h"
#include "engine/daemon/metrics_http.h"
#include "engine/link/link_server.h"
#include "engine/link/paced_link.h"
#include "engine/replication/sink.h"
#include "engine/replication/source.h"

namespace cairn {

class Daemon final : public ControlService {
 public:
  // Connects to Ceph and checks the configuration against the cluster
  // (pools exist, the cephx key works). Errors say what to fix.
  static StatusOr<std::unique_ptr<Daemon>> Create(DaemonConfig config);
  ~Daemon() override;

  // How long a fenced sink stays blocklisted, and how often a running sink
  // checks that it was not fenced.
  static constexpr std::chrono::seconds kFenceExpire{3600};
  static constexpr std::chrono::seconds kFenceCheckPeriod{5};

  // What `cairnd --check` checks beyond Create's: the sink's spool takes a
  // synced write; every volume's peer is a Cairn sink that would take it
  // (a probe Hello: pool served, target image ours or free, the sink's
  // spool writable). One line per check in `report`; the first failure.
  Status Check(std::vector<std::string>* report);

  // Binds the sink port and the control socket, starts replication.
  Status Start();
  void Stop();

  StatusOr<std::vector<VolumeStatusInfo>> VolumeStatus(const std::string& volume) override;
  // The Prometheus page (metrics.h) of every volume, now.
  std::string Metrics();
  StatusOr<std::vector<RestorePoint>> Points(const std::string& volume) override;
  StatusOr<RestoreResult> Restore(const std::string& volume, uint64_t seq,
                                  const std::string& to_image, bool full, bool force) override;
  StatusOr<uint64_t> Replicate(const std::string& volume) override;
  StatusOr<VerifyStarted> Verify(const std::string& volume, uint64_t seq, bool repair) override;
  StatusOr<DrillResult> DrillStart(const std::string& volume, uint64_t seq,
                                   const std::string& image) override;
  StatusOr<std::vector<std::string>> DrillStop(const std::string& volume,
                                               const std::string& image) override;
  StatusOr<VolumeStatusInfo> Register(const Registration& r) override;
  StatusOr<std::vector<VolumeStatusInfo>> RegisterMany(
      const std::vector<Registration>& rs) override;
  Status Unregister(const std::string& volume, bool remove_snapshots) override;
  StatusOr<PromoteResult> Promote(const std::string& volume, uint64_t seq, const std::string& pool,
                                  const std::string& to_image) override;
  StatusOr<std::string> Release(const std::string& volume) override;
  StatusOr<Resolved> Resolve(const std::string& volume, const std::string& keep_site) override;
  StatusOr<FailedBack> Failback(const std::string& volume, uint64_t seq) override;
  StatusOr<std::vector<GroupStatusInfo>> GroupStatus(const std::string& group) override;
  StatusOr<uint64_t> ReplicateGroup(const std::string& group) override;
  StatusOr<std::vector<GroupPoint>> GroupPoints(const std::string& group) override;
  StatusOr<std::vector<RestoreResult>> RestoreGroup(const std::string& group, uint64_t seq,
                                                    const std::string& suffix, bool full,
                                                    bool force) override;
  StatusOr<GroupImages> DrillGroup(const std::string& group, uint64_t seq, bool stop) override;
  StatusOr<GroupImages> PromoteGroup(const std::string& group, uint64_t seq,
                                     const std::string& suffix) override;
  StatusOr<std::vector<VolumeStatusInfo>> ReplicateGroupBack(
      const std::string& group, const std::vector<Registration>& back) override;
  StatusOr<GroupFailedBack> FailbackGroup(const std::string& group, uint64_t seq) override;

 private:
  explicit Daemon(DaemonConfig config) : config_(std::move(config)) {}
  StatusOr<std::shared_ptr<Pool>> OpenPool(const std::string& name);
  StatusOr<std::shared_ptr<KvStore>> OpenCatalog(const std::string& pool);
  // The restore point of volume `v` that its image holds as cairn.<seq>,
  // from the catalog of its pool at this site (SourceReplicator::
  // set_base_point): the point it was promoted from here, or the newest
  // one replication in reverse made on it. nullopt for a volume that only
  // ever was a primary here.
  // keep_source: `cairn resolve VOLUME --keep <this site>` was said here.
  StatusOr<std::optional<SourceReplicator::BasePoint>> BasePointOf(const VolumeConfig& v);
  // Why the source of `v` must stand by (SourceReplicator::set_stand_down):
  // this site's sink owns its image, as the standby of a volume failed
  // over to another site. "" if not.
  StatusOr<std::string> StandDownReason(const VolumeConfig& v);
  // Stops the replicator of `volume` and forgets it (its registration
  // too, if it was registered): a planned failback ended it. Returns it.
  StatusOr<std::shared_ptr<SourceReplicator>> RetireSource(const std::string& volume);
  // ReleaseFailedOver of a member of `group` replicating back: the group
  // stops, the promoted image leaves the RBD group here, the volume is
  // released and forgotten, and the group goes on without it (all undone
  // if the release fails). register_mu_ held.
  StatusOr<std::string> ReleaseGroupMember(const std::string& volume, const std::string& group,
                                           const Catalog::Promotion& promoted);
  // Forgets the registration of `volume`, if it has one (registry and
  // registered_). register_mu_ held.
  Status ForgetRegistration(const std::string& volume);
  // A member of a group failed over here (daemon_group_failback.cc): its
  // promotion, the site its points came from, its source replicating back.
  struct BackMember {
    Catalog::Promotion promoted;
    std::string home;
    std::shared_ptr<SourceReplicator> src;
  };
  // The promoted images join the RBD group `group` here, which must hold
  // no other; undone on an error. Returns those that joined now.
  StatusOr<std::vector<std::string>> JoinBackGroup(const std::string& group,
                                                   const std::vector<Registration>& rs);
  // Every member can come home at group point `want`: it is each one's
  // newest at home, and nothing is left behind (CheckNothingLeftBehind).
  Status CheckGroupComesHome(const std::string& group, uint64_t want,
                             const std::map<std::string, BackMember>& members);
  // Hands every member back at `want` (the group stopped), then takes the
  // point here for each (Sink::FoldBack). register_mu_ held.
  StatusOr<GroupFailedBack> HandGroupBack(const std::string& group, uint64_t want,
                                          const std::map<std::string, BackMember>& members);
  // Release (and resolve for the other site): the sink's Release, and the
  // source that replicated the promoted image back stops and is forgotten
  // (restarted if the release fails).
  StatusOr<std::string> ReleaseFailedOver(const std::string& volume);
  // The promotion of `volume` at this sink and the point it was promoted
  // from; FailedPrecondition if it is not failed over here.
  StatusOr<std::pair<Catalog::Promotion, RestorePoint>> FindPromotion(const std::string& volume);
  // Nothing is left behind by a failback at point `seq`: the promoted
  // image has that snapshot, no other client holds it open, and nothing
  // was written since. Else FailedPrecondition saying what to do.
  Status CheckNothingLeftBehind(const Catalog::Promotion& promoted, uint64_t seq,
                                const std::string& home);
  // Fences the previous sink instance of every [sink] pool, records this one.
  Status FencePreviousSink();
  // Why this sink is fenced (another instance registered, or this client is
  // blocklisted), or "" if it is not.
  std::string FencedBy();
  void WatchFencing();
  // Gives up the sink locks (a clean stop: the next sink fences nobody).
  void ReleaseSinkLocks();
  // A started replicator of `v`; the caller adds it to sources_.
  StatusOr<std::shared_ptr<SourceReplicator>> StartSource(const VolumeConfig& v);
  // The same, not started yet.
  StatusOr<std::shared_ptr<SourceReplicator>> MakeSource(const VolumeConfig& v);
  // Starts the replicators of the [volume] sections, and the consistency
  // groups of those that name one (daemon_group.cc).
  Status StartVolumes();
  // Starts group `name` of `members` (one pool), adding them to sources_
  // and groups_.
  Status StartGroup(const std::string& name, const std::vector<VolumeConfig>& members);
  // Stops group `name` and its members' replicators, and forgets them.
  void StopGroup(const std::string& name);
  // Starts registered group `name` again with its registered members now
  // (none: it stays stopped). register_mu_ held.
  Status RestartRegisteredGroup(const std::string& name);
  std::shared_ptr<GroupSource> FindGroup(const std::string& group);
  // The replicator of `volume`, or null. Takes sources_mu_ only to look.
  std::shared_ptr<SourceReplicator> FindSource(const std::string& volume);
  // The [source] settings applied to a registration.
  VolumeConfig RegisteredVolume(const Registration& r) const;
  // Loads and starts every volume registered in the [source] pools.
  Status StartRegistered();
  // A registration's group, if it names one, exists in its pool, holds
  // its image, is no [volume] group, and its other members share the
  // pool and target pool.
  Status CheckGroupRegistration(const Registration& r, Pool& pool);
  // Stops the replicator of `volume` (on its own schedule) and forgets it.
  void StopSource(const std::string& volume);
  // A registration checked, with what it changes (register_mu_ held).
  struct Prepared {
    Registration r;                          // with its targets filled in
    VolumeConfig v;                          // as it replicates
    bool known = false;                      // registered already, just so: nothing changes
    std::optional<Registration> moved_from;  // registered already, otherwise
  };
  StatusOr<Prepared> PrepareRegistration(const Registration& req);
  // RegisterMany, register_mu_ held.
  StatusOr<std::vector<VolumeStatusInfo>> RegisterManyLocked(const std::vector<Registration>& rs);
  // kFailedPrecondition, saying what to add, without a [source] section.
  Status TakesRegistrations() const;
  // Records `ps` (none known) in their pool's registry in one commit and
  // in registered_; those moved leave their own schedule or old group
  // (which goes on without them, restarted unless it is `except`).
  Status RecordRegistrations(const std::vector<Prepared>& ps, const std::string& except);

  DaemonConfig config_;
  std::shared_ptr<RbdCluster> cluster_;
  std::shared_ptr<MemoryBudget> budget_;  // [cairnd] memory_budget
  std::shared_ptr<Pacer> pacer_;          // [cairnd] max_send_rate; null: no cap
  // Between the sink and the sources: an image the sink takes in reverse
  // is snapshotted by no source meanwhile.
  std::shared_ptr<ImageGate> gate_ = std::make_shared<ImageGate>();
  std::shared_ptr<const TlsContext> tls_;  // [tls]; null if insecure
  std::optional<uint32_t> control_gid_;    // [cairnd] control_group
  std::optional<uint32_t> admin_gid_;      // [cairnd] admin_group
  // How a source of `v` connects to its sink: TLS, and the name the
  // sink's certificate must carry.
  LinkOptions LinkTo(const VolumeConfig& v, std::chrono::milliseconds stall) const;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Pool>> pools_;
  std::map<std::string, std::shared_ptr<KvStore>> catalogs_;
  std::unique_ptr<Sink> sink_;
  std::unique_ptr<LinkServer> sink_server_;
  std::unique_ptr<LinkServer> control_server_;
  std::unique_ptr<MetricsServer> metrics_;  // [cairnd] metrics_listen
  // One registration or unregistration at a time (held across their RADOS
  // calls); sources_mu_ is only ever held to read or change the two below,
  // never across a call to Ceph, so status and points never wait on one.
  std::mutex register_mu_;
  std::mutex sources_mu_;  // guards sources_ and registered_
  std::vector<std::shared_ptr<SourceReplicator>> sources_;
  std::vector<std::shared_ptr<GroupSource>> groups_;  // guarded by sources_mu_
  std::map<std::string, Registration> registered_;    // by volume id
  SinkInstance sink_instance_;                        // this sink, as recorded in the catalogs
  std::map<std::string, std::unique_ptr<SinkLock>> sink_locks_;  // by pool
  std::thread fence_watch_;
  std::mutex fence_mu_;
  std::condition_variable fence_cv_;
  bool fence_stop_ = false;
};

}  // namespace cairn
