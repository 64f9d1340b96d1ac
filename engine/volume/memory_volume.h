// MemoryPool and MemoryVolume: the Volume seam (engine/volume/volume.h) in memory,
// for unit tests and the simulator. Faults are injected by wrapping a
// MemoryPool in a FaultPool (fault_pool.h), as any other Pool.
//
// Model. An image is a size, a sparse map of fixed-size chunks (only chunks
// that were written are allocated) and its snapshots in creation order.
// Chunks are immutable and shared, so a snapshot is a copy of the chunk map:
// O(allocated chunks), no bytes copied. A write replaces the chunks it
// touches; a StartZero that leaves a chunk all zeros drops it (as RBD drops a
// whole zeroed object), while a StartWrite of zeros keeps it allocated.
//
// Behaviour shared with RbdVolume (engine/ceph/rbd_volume.h), so one conformance
// suite (tests/unit/volume/volume_conformance.h) passes on both:
//  - I/O that reaches past the end of the image fails to start with
//    kInvalidArgument; I/O that would write a snapshot fails to start with
//    kFailedPrecondition.
//  - DiffExtents is chunk-granular: a chunk allocated at `to_snap` that
//    `from_snap` lacks, or whose bytes differ, is kData; a chunk allocated at
//    `from_snap` and absent at `to_snap` is kZero. Extents are clipped to the
//    size at `to_snap` and adjacent extents of the same kind are merged.
//    (RBD is exact within an object between two snapshots and lists
//    [object start, end of its data) from the empty image; both meet the
//    contract of Volume::DiffExtents.)
//  - Shrinking drops the bytes beyond the new size: growing again reads zeros.
//  - Clone copies the chunk map (no copy-on-write link) but pins the parent
//    snapshot as RBD does: RemoveSnap of it fails with kFailedPrecondition
//    while the clone exists.
//  - Remove also removes the image's snapshots; it fails with
//    kFailedPrecondition while a read-write handle is open (a Volume that
//    used the head: resized, took or removed a snapshot, opened head I/O;
//    or an AsyncIo at the head), or while a snapshot has clones.
//  - A read at a snapshot that was removed (or whose image was) after the
//    AsyncIo was opened reads zeros and succeeds, as RADOS answers it;
//    ConfirmSnap is what reports the loss.
//  - AsyncIo applies each operation when it starts; WaitOne returns the
//    completions in start order (RBD returns them in any order).
//  - Groups (CreateGroup, AddToGroup; an image is in at most one group):
//    CreateGroupSnap snapshots every member under the pool's lock, so no
//    write lands between two members. A member's share of a group snapshot
//    is one of its snapshots, listed and read like any other, and created,
//    removed and renamed only with the group (kInvalidArgument otherwise).
//    Neither Clone nor DiffExtents' `from_snap` takes a share
//    (kInvalidArgument): librbd cannot either.
//
// Handles opened on the same image share its state: a write through one is
// seen through every other, opened before or after.
//
// Thread-safety: MemoryPool is thread-safe (one mutex guards the pool and all
// its images). A MemoryVolume or AsyncIo is used by one thread at a time, as
// volume.h says.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/volume/volume.h"

namespace cairn {

namespace memory_internal {
struct PoolState;
struct ImageState;
}  // namespace memory_internal

struct MemoryPoolOptions {
  // Allocation and diff granularity in bytes; a power of two, >= 512.
  uint64_t chunk_size = 64 * 1024;
  // Unix time in nanoseconds, stamped on each new snapshot. The system clock
  // if empty; tests inject their own to control timestamps.
  std::function<int64_t()> now_ns;
};

class MemoryPool final : public Pool {
 public:
  explicit MemoryPool(std::string name = "memory", MemoryPoolOptions options = {});
  ~MemoryPool() override;
  MemoryPool(const MemoryPool&) = delete;
  MemoryPool& operator=(const MemoryPool&) = delete;

  const std::string& name() const override;

  StatusOr<std::unique_ptr<Volume>> Open(const std::string& image) override;
  // kInvalidArgument if `image` is empty.
  Status Create(const std::string& image, uint64_t size) override;
  Status Remove(const std::string& image) override;
  Status Rename(const std::string& from, const std::string& to) override;
  StatusOr<bool> Exists(const std::string& image) override;
  // kInvalidArgument if `snap` is empty (only a snapshot can be cloned) or
  // a share of a group snapshot.
  Status Clone(const std::string& image, const std::string& snap, const std::string& dest) override;
  // kInvalidArgument if `snap` is empty. Calls `progress` (if set) with
  // (0, size) and (size, size).
  Status Copy(const std::string& image, const std::string& snap, const std::string& dest,
              const ProgressFn& progress) override;

  StatusOr<std::vector<std::string>> GroupImages(const std::string& group) override;
  // kInvalidArgument if `snap` is empty; kAlreadyExists also if a member
  // still holds a share of an older group snapshot `snap` (of a group it
  // left). Cost: O(allocated chunks of the members), under the lock.
  Status CreateGroupSnap(const std::string& group, const std::string& snap) override;
  // From every image it was taken of that still exists, members or not.
  Status RemoveGroupSnap(const std::string& group, const std::string& snap) override;
  StatusOr<std::vector<std::string>> GroupSnaps(const std::string& group) override;
  Status JoinGroup(const std::string& group, const std::string& image) override;
  Status LeaveGroup(const std::string& group, const std::string& image) override;

  // Tests: an empty group. kAlreadyExists if it exists; kInvalidArgument if
  // `group` is empty.
  Status CreateGroup(const std::string& group);
  // Tests: `image` joins `group`. kNotFound if either is missing;
  // kAlreadyExists if it is in `group` already, kFailedPrecondition if it
  // is in another. Removing or renaming the image keeps it out of, or in,
  // the group, as RBD's group membership follows the image (by id).
  Status AddToGroup(const std::string& group, const std::string& image);
  // Tests: `image` leaves `group`, keeping its shares of the group's
  // snapshots. kNotFound if either is missing or the image is not in it.
  Status RemoveFromGroup(const std::string& group, const std::string& image);

  // Bytes of the allocated chunks of image@snap (the head if `snap` is
  // empty): what a sparse store would hold. kNotFound if there is no such
  // image or snapshot.
  StatusOr<uint64_t> AllocatedBytes(const std::string& image, const std::string& snap = "");
  // What Volume::OtherClients of `image` answers from now on (tests: a
  // guest that holds it open). kNotFound if there is no such image.
  Status SetOtherClients(const std::string& image, std::vector<std::string> clients);
  // Tests: bit rot. Flips the bits of the byte at `offset` of image@snap
  // (the head if `snap` is empty) where it is stored, so every snapshot
  // and head sharing that chunk reads it changed, as an object that rots
  // under RBD. kNotFound if there is no such image or snapshot, or the
  // chunk was never written.
  Status RotByte(const std::string& image, const std::string& snap, uint64_t offset);

 private:
  std::shared_ptr<memory_internal::PoolState> state_;
};

// One open image of a MemoryPool; made by MemoryPool::Open.
class MemoryVolume final : public Volume {
 public:
  MemoryVolume(std::shared_ptr<memory_internal::PoolState> pool,
               std::shared_ptr<memory_internal::ImageState> image, std::string name);
  ~MemoryVolume() override;
  MemoryVolume(const MemoryVolume&) = delete;
  MemoryVolume& operator=(const MemoryVolume&) = delete;

  const std::string& name() const override { return name_; }
  StatusOr<uint64_t> Size() override;
  Status Resize(uint64_t new_size) override;
  // Shares of group snapshots included, named GroupSnapName(group snapshot).
  StatusOr<std::vector<SnapInfo>> ListSnaps() override;
  // kAlreadyExists if `snap` exists; kInvalidArgument if it is empty or a
  // group snapshot's name (IsGroupSnapName), here and in RemoveSnap and
  // RenameSnap.
  using Volume::CreateSnap;
  Status CreateSnap(const std::string& snap, Writers writers) override;
  // kFailedPrecondition if a clone of the snapshot exists.
  Status RemoveSnap(const std::string& snap) override;
  Status RenameSnap(const std::string& from, const std::string& to) override;
  StatusOr<std::vector<std::string>> OtherClients() override;
  // An empty `to_snap` means the head. kNotFound if either snapshot is
  // missing; kInvalidArgument if `from_snap` is newer than `to_snap` or is
  // a share of a group snapshot.
  // Cost: O(allocated chunks of both) under the lock, then the comparison
  // of the chunks that are not shared.
  Status DiffExtents(const std::string& from_snap, const std::string& to_snap,
                     const std::function<Status(const Extent&)>& fn) override;
  // kNotFound if `snap` is not empty and there is no such snapshot.
  StatusOr<std::unique_ptr<AsyncIo>> OpenIo(const std::string& snap) override;
  Status ConfirmSnap(const std::string& snap, uint64_t snap_id) override;
  // Chunks are never modified once shared: unchanged means the head holds
  // the very chunks of `snap` at the same size.
  StatusOr<bool> ChangedSince(const SnapInfo& snap) override;
  void CloseHandles() override;

 private:
  std::shared_ptr<memory_internal::PoolState> pool_;
  // Counts this volume among the image's head handles from its first use
  // of the head on. REQUIRES: the pool's lock held.
  void HoldHeadLocked();

  std::shared_ptr<memory_internal::ImageState> image_;
  std::string name_;
  bool holds_head_ = false;  // guarded by the pool's lock
};

}  // namespace cairn
