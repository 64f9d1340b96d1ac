// FaultPool, FaultVolume and FaultAsyncIo: a fault-injecting layer of the
// Volume seam (engine/volume/volume.h) that stacks on any Pool, the
// in-memory twin (memory_volume.h) or librbd (engine/ceph/rbd_volume.h).
//
// Before every operation listed by VolumeOp, the layer asks a
// VolumeFaultFn. OK lets the operation through to the wrapped store
// unchanged. Any other status is the fault:
//  - an I/O (kRead, kWrite, kZero) is not started on the wrapped store: its
//    Start* returns OK and the fault's status (annotated "reading
//    POOL/IMAGE@SNAP at OFFSET~LENGTH") arrives with its completion, from
//    WaitOne, as a failed I/O of the store would. Nothing is read, written
//    or zeroed.
//  - every other operation returns the fault and does nothing.
// The others (Size, ListSnaps, ConfirmSnap, ChangedSince,
// CloseSnapshotHandles, CloseHandles, Exists, Rename, GroupImages,
// GroupSnaps, JoinGroup, LeaveGroup) are not fault points:
// they pass straight through, as they did in the in-memory store's hook
// that this layer replaced. The fault is asked before the wrapped store
// checks the arguments, so a faulted operation fails with the fault even
// where the store would have refused it.
//
// Ownership: a FaultPool does not own the Pool it wraps; the wrapped pool
// must outlive the FaultPool and every FaultVolume and FaultAsyncIo made
// through it. The FaultVolumes and FaultAsyncIos own what the wrapped pool
// returned and share the fault with the FaultPool: SetFault affects handles
// opened before it, and they may outlive the FaultPool itself.
//
// Thread-safety: FaultPool is thread-safe if the wrapped pool is;
// SetFault may be called from any thread at any time. The VolumeFaultFn is
// called on the thread doing the operation, with no lock of this layer
// held, so it may use the pools (even this one) and block. FaultVolume and
// FaultAsyncIo are used by one thread at a time, as volume.h says.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "engine/base/status.h"
#include "engine/volume/volume.h"

namespace cairn {

// Where a fault can be injected.
enum class VolumeOp {
  kOpen,
  kCreate,
  kRemove,
  kClone,
  kCopy,
  kResize,
  kCreateSnap,
  kRemoveSnap,
  kDiff,
  kOpenIo,
  kRead,
  kWrite,
  kZero,
  kDrain,
  kRenameSnap,
  kCreateGroupSnap,  // `image` is the group, `snap` the group snapshot
  kRemoveGroupSnap,  // likewise
};

struct VolumeFaultPoint {
  VolumeOp op;
  std::string image;
  std::string snap;     // the snapshot concerned, or "" for the head
  uint64_t offset = 0;  // I/O only
  uint64_t length = 0;  // I/O only
};

// Returns the status the operation must fail with, or OK to let it run.
using VolumeFaultFn = std::function<Status(const VolumeFaultPoint&)>;

namespace fault_internal {
// The fault of one FaultPool, shared with its volumes and I/Os.
class FaultSlot;
}  // namespace fault_internal

class FaultPool : public Pool {
 public:
  // REQUIRES: `inner` outlives this pool and every handle made through it.
  explicit FaultPool(Pool& inner);
  ~FaultPool() override;
  FaultPool(const FaultPool&) = delete;
  FaultPool& operator=(const FaultPool&) = delete;

  // Installs `fn` to be consulted before every operation of this pool and
  // of every volume and I/O opened through it, before or after; an empty
  // `fn` removes it.
  void SetFault(VolumeFaultFn fn);

  // The wrapped pool's name.
  const std::string& name() const override;
  // A FaultVolume over the wrapped pool's volume.
  StatusOr<std::unique_ptr<Volume>> Open(const std::string& image) override;
  Status Create(const std::string& image, uint64_t size) override;
  Status Remove(const std::string& image) override;
  StatusOr<bool> Exists(const std::string& image) override;
  Status Rename(const std::string& from, const std::string& to) override;
  Status Clone(const std::string& image, const std::string& snap, const std::string& dest) override;
  Status Copy(const std::string& image, const std::string& snap, const std::string& dest,
              const ProgressFn& progress) override;
  StatusOr<std::vector<std::string>> GroupImages(const std::string& group) override;
  // A fault fails the whole group snapshot: no member gets a share.
  Status CreateGroupSnap(const std::string& group, const std::string& snap) override;
  Status RemoveGroupSnap(const std::string& group, const std::string& snap) override;
  StatusOr<std::vector<std::string>> GroupSnaps(const std::string& group) override;
  Status JoinGroup(const std::string& group, const std::string& image) override;
  Status LeaveGroup(const std::string& group, const std::string& image) override;

 private:
  Pool& inner_;
  std::shared_ptr<fault_internal::FaultSlot> fault_;
};

// One volume opened through a FaultPool; forwards every call to the
// wrapped volume after asking the fault.
class FaultVolume final : public Volume {
 public:
  FaultVolume(std::unique_ptr<Volume> inner, std::string pool_name,
              std::shared_ptr<fault_internal::FaultSlot> fault);
  ~FaultVolume() override;
  FaultVolume(const FaultVolume&) = delete;
  FaultVolume& operator=(const FaultVolume&) = delete;

  const std::string& name() const override { return inner_->name(); }
  StatusOr<uint64_t> Size() override;
  Status Resize(uint64_t new_size) override;
  StatusOr<std::vector<SnapInfo>> ListSnaps() override;
  using Volume::CreateSnap;
  Status CreateSnap(const std::string& snap, Writers writers) override;
  Status RemoveSnap(const std::string& snap) override;
  Status RenameSnap(const std::string& from, const std::string& to) override;
  StatusOr<std::vector<std::string>> OtherClients() override { return inner_->OtherClients(); }
  Status DiffExtents(const std::string& from_snap, const std::string& to_snap,
                     const std::function<Status(const Extent&)>& fn) override;
  // A FaultAsyncIo over the wrapped volume's.
  StatusOr<std::unique_ptr<AsyncIo>> OpenIo(const std::string& snap) override;
  Status ConfirmSnap(const std::string& snap, uint64_t snap_id) override;
  StatusOr<bool> ChangedSince(const SnapInfo& snap) override;
  void CloseSnapshotHandles() override;
  void CloseHandles() override;

 private:
  std::unique_ptr<Volume> inner_;
  std::string pool_name_;
  std::shared_ptr<fault_internal::FaultSlot> fault_;
};

// The I/O of a FaultVolume. Completions come back in start order where
// the wrapped store keeps it (memory); a faulted one waits behind the
// operations of the wrapped store started before it. InFlight counts both.
class FaultAsyncIo final : public AsyncIo {
 public:
  // `pool`, `image` and `snap` (empty: the head) are what the faults are
  // asked about and what their messages name.
  FaultAsyncIo(std::unique_ptr<AsyncIo> inner, std::string pool, std::string image,
               std::string snap, std::shared_ptr<fault_internal::FaultSlot> fault);
  ~FaultAsyncIo() override;
  FaultAsyncIo(const FaultAsyncIo&) = delete;
  FaultAsyncIo& operator=(const FaultAsyncIo&) = delete;

  Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) override;
  Status StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) override;
  Status StartZero(uint64_t tag, uint64_t offset, uint64_t length) override;
  Completion WaitOne() override;
  size_t InFlight() const override { return started_.size(); }
  // The wrapped store's, plus the faulted writes among `writes` (started
  // by the caller, but no store operation).
  WriteStats write_stats() const override;
  // Waits for every operation, faulted or not; then asks the fault
  // (kDrain); then drains the wrapped I/O (RBD: flushes). Returns the
  // first error of these.
  Status Drain() override;

 private:
  // Asks the fault about an I/O. True if it is faulted: then its
  // completion is queued and it must not be started on the wrapped store.
  bool Faulted(VolumeOp op, uint64_t tag, uint64_t offset, uint64_t length);

  std::unique_ptr<AsyncIo> inner_;
  const std::string pool_;
  const std::string image_;
  const std::string snap_;
  std::shared_ptr<fault_internal::FaultSlot> fault_;
  // One entry per operation in flight, in start order: a faulted one holds
  // its completion, one started on the wrapped store holds nothing.
  std::deque<std::optional<Completion>> started_;
  uint64_t faulted_writes_ = 0;
};

}  // namespace cairn
