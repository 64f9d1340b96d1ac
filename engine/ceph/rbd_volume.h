// RbdPool and RbdVolume: the Volume seam (engine/volume/volume.h) over the
// librbd and librados C APIs (Ceph 16 Pacific and later), on a pool that an
// RbdCluster (engine/ceph/rados.h) opened. The implementation is split by
// concern: rbd_image.cc (image contexts, metadata), rbd_aio.cc (one aio
// op and its completion queue), rbd_io.cc (AsyncIo, object writes),
// rbd_copy.cc (sparse copies), rbd_diff.cc (DiffExtents),
// rbd_changed_since.cc (ChangedSince),
// rbd_snapshots.cc (CreateSnap and its settling, RemoveSnap, ConfirmSnap),
// rbd_pool.cc (RbdPool), rbd_group.cc (RbdPool's group snapshots),
// rbd_volume.cc (handles, size, snapshot list).
//
// How the Volume contract maps onto librbd:
//  - DiffExtents opens the image read-only at `to_snap` and works in two
//    passes, so its cost follows the change, not the image size: a
//    whole-object rbd_diff_iterate2 (answered from the object maps when the
//    image has fast-diff and valid maps) finds the changed objects, then an
//    exact rbd_diff_iterate2 over just those objects lists the changed
//    bytes. Without usable fast-diff it makes the exact pass over the whole
//    image (cost: one RADOS op per object). Granularity seen on Pacific:
//    exact bytes between two snapshots; [object start, end of the object's
//    data) from the empty image. For a clone diffed from the empty image
//    the listing is whole objects (an exact pass would re-walk the parent
//    for every range). An object the maps flag but the exact pass does not
//    (a write filed under older snapshots, see CreateSnap) is listed whole.
//  - CreateSnap settles the snapshot (unless only this process writes the
//    image, Volume::Writers): clients that began watching the
//    image during it are told of it again, and it returns no sooner than
//    50 ms after the snapshot (rbd_snapshots.cc, "Settling").
//  - AsyncIo at the head shares the volume's read-write handle; at a
//    snapshot it opens its own read-only handle. Completions come back from
//    librbd's threads through a queue; WaitOne returns them in completion
//    order. Writes at the head that fall in one RADOS object go out as one
//    op: the first through librbd (object map, copy-up, exclusive lock,
//    snapshot clone), the others together once it has completed, written
//    to the object beside librbd (rbd_io.cc, ObjectWriter). Not for
//    journaling, fancy striping or format 1 images. StartZero is rbd_aio_write_zeroes (guaranteed
//    zeros; discard may skip unaligned parts), and frees whole objects it covers.
//  - Clone protects the snapshot (clone format 1 needs it), then
//    rbd_clone3. RemoveSnap of a protected snapshot unprotects it only if no
//    clone depends on it.
//  - Copy lists the allocated extents of the snapshot and copies them with
//    8 reads/writes of up to 4 MiB in flight, skipping all-zero pieces: the
//    copy stays sparse, and its cost follows the data, not the image size.
//  - Remove also removes the image's snapshots, but first checks that no
//    client has the image open and no clone depends on a snapshot, so that
//    a refused Remove changes nothing.
//  - Groups are RBD groups (`rbd group create`, `rbd group image add`).
//    CreateGroupSnap is rbd_group_snap_create (librbd takes the exclusive
//    lock of every member, then snapshots them), and settles every member's
//    share as CreateSnap does. librbd names a share
//    ".group.<pool>_<group id>_<group snapshot id>" and resolves only user
//    snapshots by name, so ListSnaps names a share GroupSnapName(group
//    snapshot) from the group's record, and a handle is moved to a share by
//    id (OpenImage). Shares of incomplete group snapshots (being taken, or a
//    take that died midway) are not listed, nor are those group snapshots.
//
// Every librbd/librados error becomes a Status through ErrnoStatus, with a
// message naming pool/image@snap.
//
// Thread-safety: RbdPool is thread-safe, as librados is. An RbdVolume or
// AsyncIo is used by one thread at a time, as volume.h says.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/ceph/rados.h"
#include "engine/volume/volume.h"

namespace cairn {

namespace rbd_internal {
class Image;
class SettleBook;
}  // namespace rbd_internal

// The RBD images of one pool.
class RbdPool final : public Pool {
 public:
  explicit RbdPool(std::shared_ptr<RadosIoCtx> io, RbdPoolOptions options = {});

  const std::string& name() const override { return io_->pool(); }

  // Opens the image: a read-only probe now (kNotFound if it is missing),
  // read-write on the first operation that needs it (which registers a
  // watch).
  StatusOr<std::unique_ptr<Volume>> Open(const std::string& image) override;
  // A format-2 image with options().features and options().order.
  // kInvalidArgument if `image` is empty.
  Status Create(const std::string& image, uint64_t size) override;
  // Removes the image and its snapshots. kFailedPrecondition, with nothing
  // removed, if a client has the image open or a clone depends on one of
  // its snapshots.
  Status Remove(const std::string& image) override;
  Status Rename(const std::string& from, const std::string& to) override;
  StatusOr<bool> Exists(const std::string& image) override;
  // Protects image@snap if needed, then clones it into this pool.
  // kInvalidArgument if `snap` is empty or a share of a group snapshot
  // (librbd clones only from user snapshots).
  Status Clone(const std::string& image, const std::string& snap, const std::string& dest) override;
  // kInvalidArgument if `snap` is empty. A failed copy removes what it
  // created. `progress` (if set) gets the offset below which the copy is
  // complete, and the size.
  Status Copy(const std::string& image, const std::string& snap, const std::string& dest,
              const ProgressFn& progress) override;

  // The group's images in this pool (a group may hold images of other
  // pools: those are snapshotted with it, but not listed here).
  StatusOr<std::vector<std::string>> GroupImages(const std::string& group) override;
  // kInvalidArgument if `snap` is empty; kAlreadyExists also if a member
  // holds a share of an older group snapshot named so (of a group it
  // left). Cost: a read-only open of every member, librbd's group snapshot
  // (an exclusive-lock handover per member), then the settling of each
  // member in turn (>= 50 ms each).
  Status CreateGroupSnap(const std::string& group, const std::string& snap) override;
  // From every image it was taken of, members now or not (librbd's record).
  Status RemoveGroupSnap(const std::string& group, const std::string& snap) override;
  // Complete group snapshots only. Creation order: librbd's record keeps
  // no time and its ids are random, so they are ordered by the snapshot ids
  // of their shares in this pool (allocated in order by the pool); those
  // with no share here (a group that had no image here) come last, by name.
  StatusOr<std::vector<std::string>> GroupSnaps(const std::string& group) override;
  // rbd group create (if there is none), then rbd group image add.
  Status JoinGroup(const std::string& group, const std::string& image) override;
  // rbd group image remove; the last image out removes the group.
  Status LeaveGroup(const std::string& group, const std::string& image) override;

  const RbdPoolOptions& options() const { return options_; }

 private:
  std::string Spec(const std::string& image, const std::string& snap = "") const;

  std::shared_ptr<RadosIoCtx> io_;
  const RbdPoolOptions options_;
  // What the settling of this process's snapshots saw (shared by the
  // volumes opened here: the source opens its image anew every epoch).
  std::shared_ptr<rbd_internal::SettleBook> book_;
};

// One open RBD image; made by RbdPool::Open.
class RbdVolume final : public Volume {
 public:
  // `id`: the image's id (rbd_get_id) when it was opened; every handle
  // opened later by name must find the same.
  RbdVolume(std::shared_ptr<RadosIoCtx> io, std::string id, std::string name,
            std::shared_ptr<rbd_internal::SettleBook> book);
  ~RbdVolume() override;

  const std::string& name() const override { return name_; }
  StatusOr<uint64_t> Size() override;
  Status Resize(uint64_t new_size) override;
  StatusOr<std::vector<SnapInfo>> ListSnaps() override;
  // kAlreadyExists if it exists; kInvalidArgument if `snap` is empty or a
  // group snapshot's name (IsGroupSnapName), here and in RemoveSnap and
  // RenameSnap. kThisProcessOnly skips the settling.
  using Volume::CreateSnap;
  Status CreateSnap(const std::string& snap, Writers writers) override;
  // kFailedPrecondition if a clone depends on the snapshot.
  Status RemoveSnap(const std::string& snap) override;
  Status RenameSnap(const std::string& from, const std::string& to) override;
  // The header's watchers but this process's RADOS client.
  StatusOr<std::vector<std::string>> OtherClients() override;
  // An empty `to_snap` means the head. kNotFound if a snapshot is missing;
  // kInvalidArgument if `from_snap` is newer than `to_snap` or a share of a
  // group snapshot (rbd_diff_iterate2 starts at user snapshots only). Objects that
  // changed in between go whole if this process saw clients open the image
  // around a snapshot from `from_snap` on (CreateSnap; the .cc says why).
  Status DiffExtents(const std::string& from_snap, const std::string& to_snap,
                     const std::function<Status(const Extent&)>& fn) override;
  StatusOr<std::unique_ptr<AsyncIo>> OpenIo(const std::string& snap) override;
  // Opens a fresh read-only handle by name: kNotFound unless it finds the
  // image opened (same id) with `snap`, named so, of id `snap_id`.
  Status ConfirmSnap(const std::string& snap, uint64_t snap_id) override;
  // With fast-diff: compares the head's object map with the one `snap`
  // left (read once per snapshot) and checks the maps are valid; two small
  // RADOS reads, no image open. Without fast-diff: always true.
  StatusOr<bool> ChangedSince(const SnapInfo& snap) override;
  void CloseSnapshotHandles() override;
  void CloseHandles() override;

 private:
  // A handle on the image by name at `snap`; kNotFound if the name now
  // belongs to another image than the one this volume opened.
  StatusOr<std::shared_ptr<rbd_internal::Image>> OpenSame(const std::string& snap, bool read_only);
  // kNotFound unless the name still belongs to the image this volume
  // opened (read from RADOS; no image is opened).
  Status CheckSameImage() const;
  // OK if `id` is the id of the image this volume opened, else kNotFound.
  Status SameIdAsOpened(const std::string& id) const;
  // The read-write handle, opened now if it is not yet.
  StatusOr<std::shared_ptr<rbd_internal::Image>> Head();
  // The read-write handle if open, else a transient read-only one (no watch).
  StatusOr<std::shared_ptr<rbd_internal::Image>> HeadForReading();
  // A read-only handle at `snap`: the one of the last call if it asked for
  // the same snapshot, else a new one.
  StatusOr<std::shared_ptr<rbd_internal::Image>> AtSnap(const std::string& snap);

  std::string Spec(const std::string& snap = "") const;

  std::shared_ptr<RadosIoCtx> io_;
  const std::string id_;
  // The read-write handle, opened on first need (snapshot create/remove,
  // resize, head I/O). Null until then.
  std::shared_ptr<rbd_internal::Image> head_;
  // A snapshot never changes: an epoch's reads (OpenIo) and its listing of
  // changes (DiffExtents) share one handle at it. ~30 ms saved.
  std::string snap_name_;
  std::shared_ptr<rbd_internal::Image> snap_;
  const std::string name_;
  std::shared_ptr<rbd_internal::SettleBook> book_;
  // What ChangedSince expects the head's object map to be while nothing
  // changed since snapshot `snap_id`.
  struct UnchangedMap {
    uint64_t snap_id = 0;
    bool usable = false;   // fast-diff on and the snapshot's map valid
    std::string expected;  // the head map's whole object, as it must read
    // The head map's RADOS version when a full check last found nothing
    // changed (0: none yet), and the quick checks made since.
    uint64_t map_version = 0;
    int quick_checks = 0;
  };
  // ChangedSince's steps: what the head's map reads right after `snap` was
  // taken (one header call and one map read), and the full check of the
  // head's map and header against `u`.
  StatusOr<UnchangedMap> ReadUnchangedMap(const SnapInfo& snap);
  StatusOr<bool> ChangedSinceFullCheck(const SnapInfo& snap, UnchangedMap& u);
  std::optional<UnchangedMap> unchanged_;
};

}  // namespace cairn
