// The Volume seam: everything Cairn needs from a block image store.
//
// Two implementations: RbdPool/RbdVolume over librbd (engine/ceph/rbd_volume.h)
// and MemoryPool/MemoryVolume (engine/volume/memory_volume.h) for unit tests.
// FaultPool (engine/volume/fault_pool.h) wraps either to inject faults.
// Engine code (epoch building, apply, restore) only sees these interfaces,
// so the same tests run over memory and over real Ceph.
//
// Thread-safety: a Pool may be used from several threads. A Volume and an
// AsyncIo are used by one thread at a time; completions of an AsyncIo may
// arrive on other threads internally, but WaitOne returns them to its
// caller.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/base/checksum.h"
#include "engine/base/status.h"

namespace cairn {

struct SnapInfo {
  std::string name;
  uint64_t id = 0;
  uint64_t size = 0;
  int64_t time_ns = 0;  // when the snapshot was taken (unix ns)
};

// One run of bytes that differ between two points of an image.
//   kData: read the bytes at `to_snap` and send them.
//   kZero: the bytes read as zeros at `to_snap` (discarded, never written,
//          or beyond a shrink): send no bytes.
struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  RecordKind kind = RecordKind::kData;
  friend bool operator==(const Extent&, const Extent&) = default;
};

// Asynchronous I/O on one image, at a snapshot (read-only) or at its head
// (read-write). The caller bounds the window: it starts at most N
// operations, then calls WaitOne before starting another. Buffers passed to
// Start* are owned by the caller and must stay valid until the operation's
// completion is returned by WaitOne.
class AsyncIo {
 public:
  struct Completion {
    uint64_t tag = 0;
    Status status;
  };
  virtual ~AsyncIo() = default;

  // Start* never block on the I/O itself. A failure to start is returned
  // here; a failure of the I/O arrives with its completion.
  virtual Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) = 0;
  virtual Status StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) = 0;
  // Makes [offset, offset+length) read as zeros (thin where the store can).
  virtual Status StartZero(uint64_t tag, uint64_t offset, uint64_t length) = 0;

  // Blocks until one started operation completes and returns it.
  // REQUIRES: InFlight() > 0.
  virtual Completion WaitOne() = 0;
  virtual size_t InFlight() const = 0;

  // The writes started so far, and the store operations they took (a store
  // may send several writes to one object as one operation).
  struct WriteStats {
    uint64_t writes = 0;
    uint64_t ops = 0;
  };
  virtual WriteStats write_stats() const = 0;

  // Waits for all in-flight operations, then makes completed writes
  // durable. Returns the first error seen.
  virtual Status Drain() = 0;

 protected:
  // Waits for every started operation; the first failure among them.
  Status WaitAll() {
    Status first;
    while (InFlight() > 0) {
      Completion c = WaitOne();
      if (first.ok() && !c.status.ok()) first = c.status;
    }
    return first;
  }
};

// One open image.
class Volume {
 public:
  virtual ~Volume() = default;
  virtual const std::string& name() const = 0;

  virtual StatusOr<uint64_t> Size() = 0;
  virtual Status Resize(uint64_t new_size) = 0;

  // Snapshots in creation order.
  virtual StatusOr<std::vector<SnapInfo>> ListSnaps() = 0;
  // Who writes the image while a snapshot is taken. kOthers (a primary,
  // written by guests): the store makes sure that every client writes
  // under the new snapshot from then on (RBD: the settling, rbd_volume.h).
  // kThisProcessOnly (the sink's standby image, written by the sink alone,
  // through this handle): nothing else to tell.
  enum class Writers { kOthers, kThisProcessOnly };
  virtual Status CreateSnap(const std::string& snap, Writers writers) = 0;
  Status CreateSnap(const std::string& snap) { return CreateSnap(snap, Writers::kOthers); }
  // kNotFound if there is no such snapshot.
  virtual Status RemoveSnap(const std::string& snap) = 0;
  // kNotFound if there is no `from`, kAlreadyExists if there is a `to`.
  // Clones of the snapshot keep their parent (they name it by id).
  virtual Status RenameSnap(const std::string& from, const std::string& to) = 0;

  // The clients other than this process that hold the image open (RBD:
  // the watchers of its header, by address): a guest still attached. Asked
  // before the image is written as a standby or handed over.
  virtual StatusOr<std::vector<std::string>> OtherClients() = 0;

  // Calls `fn` with the extents that differ between `from_snap` and
  // `to_snap`, ascending and non-overlapping, clipped to the size at
  // `to_snap`. An empty `from_snap` means the empty image: then only the
  // allocated extents are listed (a sparse image stays sparse). Adjacent
  // extents of the same kind may or may not be merged. Stops and returns
  // fn's error if fn fails. Cost: proportional to the change on an image
  // with fast-diff, to the image size otherwise.
  virtual Status DiffExtents(const std::string& from_snap, const std::string& to_snap,
                             const std::function<Status(const Extent&)>& fn) = 0;

  // Asynchronous I/O at `snap` (read-only) or at the head if `snap` is
  // empty (read-write).
  virtual StatusOr<std::unique_ptr<AsyncIo>> OpenIo(const std::string& snap) = 0;

  // Confirms, once reads at `snap` are done, that they read the snapshot:
  // the image under this volume's name is still the one it opened (not one
  // renamed away or removed and created anew) and still has `snap` with id
  // `snap_id`. A store may answer reads of a snapshot removed meanwhile with
  // zeros, not an error (RBD: RADOS reads the objects trimmed with it as
  // absent), so nothing read from a snapshot is trusted before this says
  // OK. kNotFound, saying what is gone, if it is not so.
  virtual Status ConfirmSnap(const std::string& snap, uint64_t snap_id) = 0;

  // False only if no byte of the head can differ from `snap` (a snapshot of
  // this image): nothing was written, discarded or resized since. True if
  // something may have changed, or if the store cannot tell cheaply. Cheap
  // where it answers false (RBD: one read of the object map, no image
  // open), as an idle volume asks it every interval.
  virtual StatusOr<bool> ChangedSince(const SnapInfo& snap) = 0;

  // Closes what the volume keeps open to read a snapshot (OpenIo and
  // DiffExtents at one snapshot share it); the next use opens it again.
  virtual void CloseSnapshotHandles() {}

  // Closes every handle the volume keeps, the head's too; the next use
  // opens it again. A volume between epochs keeps nothing open: an open
  // RBD image is a watch the cluster pings and a copy of the client's
  // configuration, per volume.
  virtual void CloseHandles() { CloseSnapshotHandles(); }
};

// Merges adjacent extents of one kind before handing them to `fn`, for
// Volume implementations whose store reports finer pieces. Call Flush()
// after the last Add. REQUIRES: extents come in ascending order.
class ExtentMerger {
 public:
  explicit ExtentMerger(const std::function<Status(const Extent&)>& fn) : fn_(fn) {}

  Status Add(const Extent& e) {
    assert(!pending_ || e.offset >= pending_->offset + pending_->length);
    if (pending_ && pending_->kind == e.kind && pending_->offset + pending_->length == e.offset) {
      pending_->length += e.length;
      return OkStatus();
    }
    RETURN_IF_ERROR(Flush());
    pending_ = e;
    return OkStatus();
  }

  Status Flush() {
    if (!pending_) return OkStatus();
    const Extent e = *pending_;
    pending_.reset();
    return fn_(e);
  }

 private:
  const std::function<Status(const Extent&)>& fn_;
  std::optional<Extent> pending_;
};

// Group snapshots: one instant across several images (a database's data
// and log volumes). A store groups images (RBD: an RBD group, whose
// membership the operator manages with `rbd group image add/remove`);
// Pool::CreateGroupSnap snapshots every image of a group at once, after
// quiescing their writers, so the snapshots together are crash-consistent.
// Each image lists its share of the group snapshot `snap` as a snapshot
// named GroupSnapName(snap). That name is read like any snapshot (OpenIo,
// DiffExtents' `to_snap`, ConfirmSnap, ChangedSince), but it is not a diff's
// `from_snap` (librbd diffs only from user snapshots: kInvalidArgument) and
// it is created, removed and renamed only with the group.
inline constexpr std::string_view kGroupSnapPrefix = "group:";
inline std::string GroupSnapName(std::string_view group_snap) {
  return std::string(kGroupSnapPrefix) + std::string(group_snap);
}
inline bool IsGroupSnapName(std::string_view snap) { return snap.starts_with(kGroupSnapPrefix); }

// Progress of a long copy: bytes done of total.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// The images of one pool of one cluster.
class Pool {
 public:
  virtual ~Pool() = default;
  virtual const std::string& name() const = 0;

  // kNotFound if the image does not exist.
  virtual StatusOr<std::unique_ptr<Volume>> Open(const std::string& image) = 0;
  // kAlreadyExists if it exists.
  virtual Status Create(const std::string& image, uint64_t size) = 0;
  virtual Status Remove(const std::string& image) = 0;
  virtual StatusOr<bool> Exists(const std::string& image) = 0;
  // kNotFound if `from` does not exist, kAlreadyExists if `to` does.
  virtual Status Rename(const std::string& from, const std::string& to) = 0;

  // A new image `dest` that reads as image@snap and shares its data
  // (instant; copy-on-write). The snapshot stays pinned while `dest` lives.
  virtual Status Clone(const std::string& image, const std::string& snap,
                       const std::string& dest) = 0;
  // A new image `dest` that is a full, independent copy of image@snap.
  // Cost: proportional to the allocated data of the snapshot.
  virtual Status Copy(const std::string& image, const std::string& snap, const std::string& dest,
                      const ProgressFn& progress) = 0;

  // The images of group `group`, by name, sorted. kNotFound if there is no
  // such group.
  virtual StatusOr<std::vector<std::string>> GroupImages(const std::string& group) = 0;
  // Snapshots every image of `group` at one instant as group snapshot
  // `snap` (see GroupSnapName). kNotFound if there is no such group,
  // kAlreadyExists if it has a snapshot `snap`. All or nothing: on an
  // error no image keeps a share of it.
  virtual Status CreateGroupSnap(const std::string& group, const std::string& snap) = 0;
  // Removes group snapshot `snap` from every image of the group. kNotFound
  // if there is no such group or snapshot.
  virtual Status RemoveGroupSnap(const std::string& group, const std::string& snap) = 0;
  // The group's snapshots, by name, in creation order.
  virtual StatusOr<std::vector<std::string>> GroupSnaps(const std::string& group) = 0;
  // `image` joins `group`, which is created if there is none (a failed-over
  // group replicating back; removed again if the image cannot join).
  // kNotFound if there is no such image;
  // kAlreadyExists if it is in `group` already, kFailedPrecondition if it
  // is in another.
  virtual Status JoinGroup(const std::string& group, const std::string& image) = 0;
  // `image` leaves `group`, keeping its shares of the group's snapshots,
  // unless it was the last: then the group is removed with its snapshots
  // (every share of them). kNotFound if either is missing or the image is
  // not in it.
  virtual Status LeaveGroup(const std::string& group, const std::string& image) = 0;
};

}  // namespace cairn
