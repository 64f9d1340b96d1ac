// RbdCluster, RbdPool and RbdVolume: the Volume seam (engine/volume/volume.h) over
// the librbd and librados C APIs (Ceph 16 Pacific and later).
//
// RbdCluster owns one connection (rados_t). Its mon and OSD operations are
// bounded by a timeout, so a dead cluster gives kUnavailable rather than a
// hang; it opens pools (RadosIoCtx) and, on them, RbdPools and KvStores.
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
//    50 ms after the snapshot (rbd_volume.cc, "Settling").
//  - AsyncIo at the head shares the volume's read-write handle; at a
//    snapshot it opens its own read-only handle. Completions come back from
//    librbd's threads through a queue; WaitOne returns them in completion
//    order. Writes at the head that fall in one RADOS object go out as one
//    op: the first through librbd (object map, copy-up, exclusive lock,
//    snapshot clone), the others together once it has completed, written
//    to the object beside librbd (rbd_volume.cc, ObjectWriter). Not for
//    journaling, fancy striping or format 1 images. StartZero is rbd_aio_write_zeroes (guaranteed zeros; discard may
//    skip unaligned parts), and frees whole objects it covers.
//  - Clone protects the snapshot (clone format 1 needs it), then
//    rbd_clone3. RemoveSnap of a protected snapshot unprotects it only if no
//    clone depends on it.
//  - Copy lists the allocated extents of the snapshot and copies them with
//    8 reads/writes of up to 4 MiB in flight, skipping all-zero pieces: the
//    copy stays sparse, and its cost follows the data, not the image size.
//  - Remove also removes the image's snapshots, but first checks that no
//    client has the image open and no clone depends on a snapshot, so that
//    a refused Remove changes nothing.
//
// Every librbd/librados error becomes a Status through ErrnoStatus, with a
// message naming pool/image@snap.
//
// Thread-safety: RbdCluster, RadosIoCtx and RbdPool are thread-safe, as
// librados is. An RbdVolume or AsyncIo is used by one thread at a time, as
// volume.h says.
#pragma once

#include <rados/librados.h>
#include <rbd/librbd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "engine/catalog/kv_store.h"
#include "engine/base/status.h"
#include "engine/volume/volume.h"

namespace cairn {

namespace rbd_internal {
class Image;
class SettleBook;
}  // namespace rbd_internal

class RbdPool;
class RadosIoCtx;

inline constexpr uint64_t kRbdDefaultFeatures = RBD_FEATURE_LAYERING | RBD_FEATURE_EXCLUSIVE_LOCK |
                                                RBD_FEATURE_OBJECT_MAP | RBD_FEATURE_FAST_DIFF |
                                                RBD_FEATURE_DEEP_FLATTEN;

struct RbdPoolOptions {
  // Features of the images this pool makes (Create, Clone, Copy). Keep
  // object-map and fast-diff: without them DiffExtents costs one RADOS op
  // per object of the image.
  uint64_t features = kRbdDefaultFeatures;
  // log2 of the object size of images made by Create: 22 is 4 MiB. Copy
  // keeps the source's.
  int order = 22;
};

// A connection to one Ceph cluster.
class RbdCluster : public std::enable_shared_from_this<RbdCluster> {
 public:
  static constexpr std::chrono::seconds kDefaultTimeout{30};

  // Connects as client.`client_id` to the cluster that `conf_path`
  // describes, with the key from `keyring_path` (or, if empty, the keyring
  // that the config names). Connecting, and every later mon and OSD
  // operation, gives up after `timeout`. The client's admin socket is
  // turned off, so that many clients can run side by side.
  // Errors: kFailedPrecondition if the config cannot be read, the keyring
  // is missing or the cluster refuses the key (the message names the user
  // and the keyring: an operator must fix them); kUnavailable if no monitor
  // answered within `timeout`.
  static StatusOr<std::shared_ptr<RbdCluster>> Connect(
      const std::string& conf_path, const std::string& client_id = "admin",
      const std::string& keyring_path = "", std::chrono::seconds timeout = kDefaultTimeout);

  ~RbdCluster();
  RbdCluster(const RbdCluster&) = delete;
  RbdCluster& operator=(const RbdCluster&) = delete;

  // kNotFound ("pool X does not exist on cluster CONF") if there is no such
  // pool.
  StatusOr<std::shared_ptr<RadosIoCtx>> OpenIoCtx(const std::string& pool);
  // The images of `pool`. Errors as OpenIoCtx.
  StatusOr<std::shared_ptr<RbdPool>> OpenPool(const std::string& pool,
                                              const RbdPoolOptions& options = {});
  // A RadosKvStore (engine/ceph/rados_kv_store.h) in the omap of `object` in
  // `pool`. Errors as OpenIoCtx.
  StatusOr<std::shared_ptr<KvStore>> OpenKvStore(const std::string& pool,
                                                 const std::string& object);

  // This connection's RADOS client address, e.g. "127.0.0.1:0/3215435001":
  // what the watchers and lockers of an image it opens list, and what
  // Blocklist takes. Unique to the connection (the part after '/' is random).
  StatusOr<std::string> ClientAddress() const;
  // Fences the client at `addr` (another connection; e.g. a cairnd killed
  // with -9) for `expire`: the OSDs drop its watches at once, so its
  // exclusive locks can be broken without waiting for the OSD to time the
  // watches out (osd_client_watch_timeout, 30 s), and refuse its I/O.
  // Returns once this connection has the OSD map with the entry.
  // kFailedPrecondition naming the cap if this user may not blocklist (needs
  // mon 'profile rbd', or 'allow command "osd blocklist"'); kInvalidArgument
  // if `addr` is not a client address.
  Status Blocklist(const std::string& addr, std::chrono::seconds expire);
  // True if the OSDs refuse this connection because another client
  // blocklisted it (a stat of `object` in `pool` answers EBLOCKLISTED).
  StatusOr<bool> Blocklisted(const std::string& pool, const std::string& object);

  rados_t handle() const { return rados_; }
  const std::string& conf_path() const { return conf_path_; }
  // "client.admin"
  const std::string& client_name() const { return client_name_; }

 private:
  RbdCluster(rados_t rados, std::string conf_path, std::string client_name);

  rados_t rados_;
  const std::string conf_path_;
  const std::string client_name_;
};

// An I/O context on one pool. Keeps its cluster connected while it lives.
class RadosIoCtx {
 public:
  RadosIoCtx(std::shared_ptr<RbdCluster> cluster, rados_ioctx_t io, std::string pool);
  ~RadosIoCtx();
  RadosIoCtx(const RadosIoCtx&) = delete;
  RadosIoCtx& operator=(const RadosIoCtx&) = delete;

  rados_ioctx_t get() const { return io_; }
  const std::string& pool() const { return pool_; }
  const RbdCluster& cluster() const { return *cluster_; }

 private:
  std::shared_ptr<RbdCluster> cluster_;
  rados_ioctx_t io_;
  const std::string pool_;
};

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
  // kInvalidArgument if `snap` is empty.
  Status Clone(const std::string& image, const std::string& snap, const std::string& dest) override;
  // kInvalidArgument if `snap` is empty. A failed copy removes what it
  // created. `progress` (if set) gets the offset below which the copy is
  // complete, and the size.
  Status Copy(const std::string& image, const std::string& snap, const std::string& dest,
              const ProgressFn& progress) override;

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
  // kAlreadyExists if it exists; kInvalidArgument if `snap` is empty.
  // kThisProcessOnly skips the settling.
  using Volume::CreateSnap;
  Status CreateSnap(const std::string& snap, Writers writers) override;
  // kFailedPrecondition if a clone depends on the snapshot.
  Status RemoveSnap(const std::string& snap) override;
  // An empty `to_snap` means the head. kNotFound if a snapshot is missing;
  // kInvalidArgument if `from_snap` is newer than `to_snap`. Objects that
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
    bool usable = false;    // fast-diff on and the snapshot's map valid
    std::string expected;   // the head map's whole object, as it must read
    // The head map's RADOS version when a full check last found nothing
    // changed (0: none yet), and the quick checks made since.
    uint64_t map_version = 0;
    int quick_checks = 0;
  };
  std::optional<UnchangedMap> unchanged_;
};

}  // namespace cairn
