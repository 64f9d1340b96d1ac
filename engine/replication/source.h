// SourceReplicator: the source role for one volume.
//
// Every `interval` (or on demand) it takes a snapshot cairn.<N> of the
// primary image, ships the epoch from the sink's newest restore point to
// cairn.<N>, waits until the sink has made cairn.<N> a restore point, and
// then drops source snapshots older than N (keeping `keep_snapshots` of
// them). It keeps no local state: the base of the next epoch is whatever
// the sink says its newest restore point is, so a restarted source resumes
// where the sink is. A snapshot taken but never acknowledged (crash, cut
// link) is shipped on the next attempt instead of taking a new one.
//
// While the sink cannot be reached, the source keeps its base and goes on
// taking a snapshot every `interval`, keeping the newest `outage_snapshots`
// of those it took (the one whose epoch the sink holds a durable prefix of
// is never dropped, so the transfer resumes where it stopped). When the
// link returns, each kept snapshot is shipped as one epoch, oldest first:
// with the default of 1, the outage costs one coalesced epoch.
//
// The primary never waits on the link: snapshots and the copy are
// out-of-band reads of the image, and a dead link only means the next
// epoch is larger.
//
// Thread-safety: Start/Stop/RequestNow/Status from any thread. RunOnce is
// for one thread at a time (the replicator's own, or a test's when not
// started).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/base/clock.h"
#include "engine/base/memory_budget.h"
#include "engine/catalog/catalog.h"
#include "engine/epoch/block_digests.h"
#include "engine/epoch/epoch.h"
#include "engine/link/link.h"
#include "engine/replication/image_gate.h"
#include "engine/replication/replication.h"
#include "engine/replication/volume_config.h"
#include "engine/volume/volume.h"

namespace cairn {

class SourceReplicator {
 public:
  using Connector = std::function<StatusOr<std::unique_ptr<Link>>()>;

  SourceReplicator(VolumeConfig config, std::string site, std::shared_ptr<Pool> pool,
                   Connector connect, LinkTimeouts timeouts = {});
  ~SourceReplicator();

  // Epochs borrow their read window from `budget` (shared by the daemon's
  // volumes); without one each takes config().window blocks. Before Start.
  void set_memory_budget(std::shared_ptr<MemoryBudget> budget) { budget_ = std::move(budget); }
  // The clock the schedule reads and waits on (tests: a ManualClock; it
  // must outlive the replicator). Before Start.
  void set_clock(Clock& clock) { clock_ = &clock; }
  // Replication in reverse (failback): what tells, at every connect, which
  // restore point of this volume the image holds as its cairn.<seq>
  // snapshot (the point it was promoted from, or one a reverse epoch
  // made here). The Hello carries it, and a sink without points of the
  // volume adopts it as the base instead of asking for a full copy.
  // nullopt: none. `keep_source`: the operator chose this site's writes in
  // a split brain (cairn resolve). Before Start.
  struct BasePoint {
    RestorePoint point;
    bool keep_source = false;
  };
  using BasePointFn = std::function<StatusOr<std::optional<BasePoint>>()>;
  void set_base_point(BasePointFn fn) { base_point_ = std::move(fn); }
  // Whether another site's sink writes this image now (the volume failed
  // over there and replicates back here): a reason, or "" if not. While
  // it says so, the replicator sends nothing, takes no snapshot, refuses
  // RequestNow and shows state standby. Asked by RequestNow, and before a
  // due epoch or outage snapshot once an attempt failed or while standing
  // by (a sink here can own the image only after the other site failed
  // the volume over, which its sink refuses this source from then on).
  // Before Start.
  using StandDownFn = std::function<StatusOr<std::string>()>;
  void set_stand_down(StandDownFn fn) { stand_down_ = std::move(fn); }
  // This process's sink, which takes the image when it becomes another
  // site's standby (image_gate.h). None: no sink here. Before Start.
  void set_image_gate(std::shared_ptr<ImageGate> gate) { gate_ = std::move(gate); }
  // Before any snapshot of the image, by this replicator or its group:
  // a pass to hold until the snapshot is taken, or FailedPrecondition
  // (nothing is taken) while another site's sink writes the image or
  // this site's sink is taking it. Asks stand_down_ (a catalog read).
  StatusOr<ImageGate::Token> SnapshotPass();

  // A member of a consistency group (GroupSource, group_source.h): the
  // group takes this image's snapshots, all members at one instant, and
  // tells it which to ship (ShipInstant); it takes none of its own. An
  // instant's snapshot is read from the group snapshot (GroupSnapName of
  // cairn.<seq>); the image's own cairn.<seq>, taken just before it, is
  // only the base the next epoch diffs from. Before Start.
  struct GroupMembership {
    std::string group;  // the store's group of this image (RBD group)
    // How many volumes instant `seq` took (the sink counts the members'
    // points against it).
    std::function<uint32_t(uint64_t seq)> members_at;
    // The group's RequestNow (a member's is the group's).
    std::function<StatusOr<uint64_t>()> request_now;
    // This volume's point of instant `seq` is made.
    std::function<void(uint64_t seq)> on_point;
  };
  void set_group(GroupMembership g) { group_ = std::move(g); }
  const std::string& group() const { return group_.group; }
  // The group took instant `seq` (this image's cairn.<seq> and its group
  // snapshot): ship it.
  void ShipInstant(uint64_t seq);
  // The group found no member changed since its newest instant, as of
  // `as_of_ns`: this member's lag counts from then, here and at the sink
  // (sent from the member's own thread), as an idle volume's does.
  void NoteUnchanged(int64_t as_of_ns);

  void Start();
  // Tells the replicator to stop (its link is closed at once) and returns;
  // Stop() then waits for it. A daemon stops all its volumes in parallel.
  void RequestStop();
  void Stop();

  // Checks, without replicating, that the peer is a Cairn sink that would
  // take this volume (a probe Hello: no session is replaced). Returns what
  // the sink said (its site, the newest point) or why it would not.
  StatusOr<std::string> Probe();

  // Planned failback: tells the sink that this volume's replication ends at
  // restore point `seq`, which it applied, and that its image is the
  // volume's primary again (Hello.hand_back_seq). Returns the point's
  // chain digest and site, and when its own snapshot of it was taken. Only
  // once this replicator is stopped.
  StatusOr<HandedBack> HandBack(uint64_t seq);

  // Asks for a new epoch now. Returns the seq of a restore point that will
  // contain every write completed before this call (a later point does too).
  // Fails if the image's snapshots cannot be listed (no safe promise then).
  StatusOr<uint64_t> RequestNow();

  // Verify (source_verify.cc): compares restore point `seq` (0: the
  // newest) at the sink with this image's snapshot cairn.<seq>, by block
  // digests (kDigestGrain), over a connection of its own beside the
  // replication (Hello.verify_seq): no data moves, and the sink records
  // the verdict with the point. Runs on a thread of its own; Report().verify
  // shows its progress and result. `repair`: on a mismatch, the next epoch
  // is compared by digests with the sink's newest point (RequestRepair).
  // Returns the verify's id; kAlreadyExists while one runs,
  // kFailedPrecondition if there is no point to verify.
  StatusOr<uint64_t> StartVerify(uint64_t seq, bool repair);
  // The next epoch (asked for now) compares this image with the sink's
  // newest point by block digests and sends only the blocks that differ:
  // a point found to differ from its source is repaired by what the next
  // point holds.
  Status RequestRepair();

  // One step: connect if needed, ship one epoch, wait until applied.
  StatusOr<EpochSummary> RunOnce();
  // Closes the link to the sink and the image (the next step reconnects
  // and opens it again). As RunOnce: not while a RunOnce runs.
  void Disconnect();

  VolumeStatusInfo Report() const;
  const VolumeConfig& config() const { return config_; }

 private:
  Status Connect();
  // stand_down_ asked, the state set to match: why it stands by, or ""
  // if it does not.
  StatusOr<std::string> StandingDown();
  // What a sink's HelloReply says.
  struct SinkHello {
    std::string site;
    uint64_t last_applied_seq = 0;
    ChainDigest last_chain;
    uint64_t resume_seq = 0;
    uint64_t resume_records = 0;
    bool takes_unchanged = false;
    int64_t last_point_time_ns = 0;
    bool serves_digests = false;
    bool resync_base = false;
    bool serves_verify = false;
    bool takes_compressed = false;
  };
  // Sends this volume's Hello on `link` and returns the sink's answer, or
  // why not (a refusal, or a peer that is not a Cairn sink: said so).
  // hand_back_seq: a planned failback's Hello (HandBack), not a session.
  StatusOr<SinkHello> Handshake(Link& link, bool probe, uint64_t hand_back_seq = 0,
                                uint64_t verify_seq = 0);
  // The verify StartVerify runs (on verify_thread_), and its comparison.
  void RunVerify(uint64_t seq, bool repair);
  Status Verify(uint64_t seq);
  // Compares the point `seq` at the sink, window by window, with this
  // site's snapshot of it open in `io` (`size` bytes).
  Status CompareAll(Link& link, AsyncIo& io, uint64_t seq, uint64_t size);
  // Compares the digests of one window and notes what differs in verify_.
  Status CompareWindow(uint64_t offset, std::string_view ours, std::string_view theirs);
  // Bytes of the image's head changed since its snapshot cairn.<seq> (0 if
  // it has none: then it cannot replicate from there anyway).
  StatusOr<uint64_t> WrittenSince(uint64_t seq);
  // One epoch: plans it, sends it with a helper beside it (AheadThread),
  // waits for the sink's acks, records the point and prunes.
  StatusOr<EpochSummary> ShipEpoch(Volume& vol);
  // What an epoch ships: its plan, the snapshot it reads up to, and the
  // image's cairn.<N> snapshots by N as listed for it.
  struct EpochStart {
    EpochPlan plan;
    SnapInfo to;
    std::map<uint64_t, SnapInfo> ours;
    // A group member's: the group snapshots of its instants, by seq (an
    // instant's point is read from there, and its time is the point's).
    std::map<uint64_t, SnapInfo> instants;
    bool repair = false;  // compared by digests with the sink's point (RequestRepair)
  };
  StatusOr<EpochStart> PlanEpoch(Volume& vol);
  // Whether the epoch planned in `e` (its snapshots listed) compares the
  // whole image with the sink's point instead of sending a diff: the base
  // snapshot is gone or of another history, the sink's image was adopted
  // without a point, or a repair was asked for (e.repair). Says why in the
  // log.
  bool DecideResync(EpochStart& e);
  // The snapshot the next epoch ships: the oldest one the sink does not
  // have yet, or a new one taken now.
  StatusOr<SnapInfo> SnapshotToShip(const std::map<uint64_t, SnapInfo>& ours);
  // A group member's: the oldest instant the sink does not have yet (its
  // group snapshot). None: kFailedPrecondition (the group takes them).
  StatusOr<SnapInfo> InstantToShip(const EpochStart& e) const;
  // The snapshots of the image as a group member sees them: its instants
  // into e->instants, and from e->ours the cairn.<N> newer than the sink's
  // point that no group snapshot completes (an instant whose group
  // snapshot failed: never shipped).
  void SortInstants(const std::vector<SnapInfo>& snaps, EpochStart* e) const;
  // The snapshot point `seq` was read from: cairn.<seq>, or for a group
  // member its instant's group snapshot.
  std::string PointSnapName(uint64_t seq) const;
  bool member() const { return !group_.group.empty(); }
  // The read window out of the daemon's memory budget (into opt->window):
  // at least one block, as much of the configured window as is free, never
  // more than an image of `image_size` holds. None without a budget;
  // kAborted if the replicator stops while it waits.
  StatusOr<std::optional<MemoryBudget::Lease>> BorrowReadWindow(uint64_t image_size,
                                                                SendOptions* opt);
  class AheadThread;
  // How long each stage of an epoch took, for the log.
  struct EpochTimes {
    Clock::TimePoint begun;  // the send began
    double plan = 0;         // snapshot and plan
    double send = 0;
    SendTimes send_detail;
    double durable = 0;  // send done -> DURABLE
    double applied = 0;  // DURABLE -> APPLIED
    double total = 0;    // the send began -> APPLIED
  };
  // Sends the epoch of `start` and waits until the sink says it is a point
  // with the chain the source computed.
  StatusOr<EpochSummary> SendAndAwaitAcks(Volume& vol, const EpochStart& start,
                                          const SendOptions& opt, AheadThread& ahead,
                                          EpochTimes* times);
  // The point is made: the status says so.
  void RecordPoint(const EpochStart& start, const EpochSummary& sum, double secs);
  Status AwaitAck(uint64_t seq, int stage, ChainDigest* chain);
  // A resync's base digests (the sink's newest point, or what its image
  // held if it has none), asked of the sink over link_.
  std::unique_ptr<BaseDigests> SinkDigests();
  // Removes cairn.<N> older than `applied` beyond keep_snapshots, through a
  // volume of its own. False if the image could not be opened.
  bool PruneSnapshots(uint64_t applied);

  // What the helper beside one epoch's send did (TakeAhead).
  struct Ahead {
    bool took = false;
    Clock::TimePoint taken_at;  // when the snapshot was begun
    double snap_secs = 0;       // how long it took
    bool pruned = false;
    double prune_secs = 0;
    // The image's snapshots as the handle that took it saw them right
    // after (empty if it could not list them).
    std::vector<SnapInfo> snaps;
  };
  // Where the epoch the helper runs beside is (guarded by mu_).
  enum class AheadMode { kSending, kSent, kEpochDone, kCancel };
  // Runs on a thread of its own beside an epoch. First removes the
  // snapshots older than `prune_base` (0: none) while the epoch is sent;
  // then, if `may_take`, takes cairn.<seq+1> once the send is through and
  // the snapshot due (at `due_at`, or when a RequestNow asks for more than
  // seq), as the sink finishes its writes and makes the point: the
  // snapshot, which waits on the guest, then costs the next point nothing.
  // Taken earlier, the next point would be older; taken after the point,
  // the next epoch would wait for it. It gives up once the epoch is done
  // and the snapshot not due, and on kCancel (a failed epoch) begins
  // nothing more.
  // `to`: the snapshot of epoch `seq`; none is taken after it unless the
  // image changed since or a point was asked for.
  void TakeAhead(uint64_t seq, const SnapInfo& to, bool may_take, uint64_t prune_base,
                 std::optional<Clock::TimePoint> due_at, Ahead* out);
  void LogEpoch(const EpochStart& start, const EpochSummary& sum, const EpochTimes& times,
                const Ahead& ahead);
  // Counts cairn.<seq> as existing before it is created, so that a
  // RequestNow meanwhile (its writes maybe not in it) promises seq + 1.
  void ReserveSnap(uint64_t seq);
  // Takes the snapshot due while the sink is unreachable and drops the
  // oldest of those taken so, beyond config_.outage_snapshots.
  void TakeOutageSnapshot();
  // A periodic epoch is due: true if the image has not changed since the
  // newest point (then no snapshot is taken, at either site).
  bool UnchangedSincePoint();
  // The image held the newest point as of `as_of_ns` (unix ns): the lag
  // counts from then; the sink is told, if it takes word of it.
  void SendUnchanged(int64_t as_of_ns);
  // The Loop's schedule (its thread's own).
  struct Schedule {
    Clock::TimePoint next;      // the next periodic epoch (or outage snapshot)
    Clock::TimePoint retry_at;  // no attempt before this (backoff)
    std::chrono::milliseconds backoff{500};
    bool outage = false;                          // the last attempt failed
    std::optional<Clock::TimePoint> carried_due;  // see ahead_taken_at_
    std::string last_error;
  };
  void Loop();
  // The first connect: the sink's newest point is known (and shown) from
  // the start, also for a volume replicated on demand only.
  void ConnectFirst(Schedule& s);
  // When the Loop, with nothing to do at `now`, wakes next.
  Clock::TimePoint WakeAt(const Schedule& s, Clock::TimePoint now, bool due) const;
  // The next check of a volume found idle.
  Clock::TimePoint NextIdleCheck() const;
  // Runs the epoch due (mu_ not held) and then, with mu_ held, sets the
  // schedule by how it went.
  void RunScheduledEpoch(Schedule& s, std::unique_lock<std::mutex>& lock);

  const VolumeConfig config_;
  const std::string site_;
  std::shared_ptr<Pool> pool_;
  Connector connect_;
  const LinkTimeouts timeouts_;
  Clock* clock_ = &RealClock();

  std::shared_ptr<MemoryBudget> budget_;
  BasePointFn base_point_;
  StandDownFn stand_down_;
  std::shared_ptr<ImageGate> gate_;
  GroupMembership group_;
  std::atomic<uint64_t> epoch_sent_bytes_{0};  // of the epoch being sent (Report)
  std::atomic<uint64_t> wire_bytes_total_{0};  // data records' payloads on the link
  int64_t sink_point_time_ns_ = 0;             // when the sink's newest point's snapshot was taken
  std::atomic<uint64_t> pinned_seq_{0};        // base point's cairn.<seq>: never pruned
  std::atomic<uint64_t> verify_pin_{0};        // cairn.<seq> being verified: never pruned
  std::unique_ptr<Link> link_;
  // The image, opened once per link and used only to read snapshots (list
  // them, diff them, read them); closed with the link. It never holds a
  // read-write handle (a watch): snapshots are taken and removed through
  // handles of their own. Opened per epoch, its open cost the primary an
  // image open more on the way to every point.
  std::unique_ptr<Volume> vol_;
  // The snapshots as listed by the last epoch's helper right after it took
  // the next one, or by RunOnce as it checked the kept image: the next
  // epoch plans from them instead of a new listing.
  // Consumed by that epoch; cleared with the link.
  std::optional<std::vector<SnapInfo>> ahead_snaps_;
  uint64_t sink_seq_ = 0;
  ChainDigest sink_chain_;
  bool sink_takes_unchanged_ = false;  // the linked sink takes Unchanged frames
  bool sink_serves_digests_ = false;   // ... and answers DigestRequest (resync by digests)
  bool sink_resync_base_ = false;      // ... and has data but no point: resync the first epoch
  // The snapshot of the newest point this process shipped (id 0: none yet).
  SnapInfo point_snap_;
  uint64_t resume_seq_ = 0;      // an epoch the sink holds a prefix of
  uint64_t resume_records_ = 0;  // ... this many records long
  // Snapshots this process took while the sink was unreachable and no epoch
  // has started from yet, oldest first: the only ones it may drop unshipped.
  std::vector<uint64_t> outage_snaps_;
  // The last epoch ended with the next one already due: its older
  // snapshots are removed while the sink works on the next (ShipEpoch).
  bool prune_deferred_ = false;
  // When the Loop's schedule makes the next epoch due (unset for a RunOnce
  // called on its own); read by ShipEpoch on the Loop's thread.
  std::optional<Clock::TimePoint> next_due_at_;
  // When the last epoch's helper began the snapshot the next epoch ships:
  // the Loop counts the next interval from there, and starts that epoch at
  // once. Set by ShipEpoch on the Loop's thread.
  std::optional<Clock::TimePoint> ahead_taken_at_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t wanted_seq_ = 0;    // RequestNow's promise still to keep
  uint64_t highest_snap_ = 0;  // newest cairn.<N> that exists (or is being made) at the source
  // highest_snap_ was learnt from a listing of the image's snapshots: from
  // then on this process takes every new one itself, and RequestNow needs
  // no listing (no librbd call in a control call).
  bool snaps_known_ = false;
  AheadMode ahead_mode_ = AheadMode::kSending;
  VolumeStatusInfo status_;  // status_.verify: the verify's, updated as it goes
  bool repair_ = false;      // the next epoch is a repair (RequestRepair)
  uint64_t verify_ids_ = 0;
  std::mutex verify_mu_;  // held to start a verify, and to join its thread
  std::thread verify_thread_;
  Link* verify_link_ = nullptr;  // the verify's own link while it runs
  // When a check last found the image unchanged since the newest point
  // (it holds the image as of then: the lag counts from there).
  int64_t unchanged_at_ns_ = 0;
  int64_t group_unchanged_ns_ = 0;  // NoteUnchanged's, for the loop to send
  std::thread thread_;
};

}  // namespace cairn
