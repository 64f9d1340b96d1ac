#include "engine/volume/fault_pool.h"

#include <fmt/format.h>

#include <cassert>
#include <mutex>
#include <utility>

namespace cairn {
namespace fault_internal {

class FaultSlot {
 public:
  void Set(VolumeFaultFn fn) {
    std::lock_guard lock(mu_);
    fn_ = std::move(fn);
  }

  // Asks the installed fault, if any, outside the lock: the function may
  // use the pools, or install another fault.
  Status Check(VolumeOp op, const std::string& image, const std::string& snap = "",
               uint64_t offset = 0, uint64_t length = 0) const {
    VolumeFaultFn fn;
    {
      std::lock_guard lock(mu_);
      fn = fn_;
    }
    if (!fn) return OkStatus();
    return fn(VolumeFaultPoint{op, image, snap, offset, length});
  }

 private:
  mutable std::mutex mu_;
  VolumeFaultFn fn_;  // guarded by mu_
};

}  // namespace fault_internal

// --- FaultPool ---------------------------------------------------------------

FaultPool::FaultPool(Pool& inner)
    : inner_(inner), fault_(std::make_shared<fault_internal::FaultSlot>()) {}

FaultPool::~FaultPool() = default;

void FaultPool::SetFault(VolumeFaultFn fn) { fault_->Set(std::move(fn)); }

const std::string& FaultPool::name() const { return inner_.name(); }

StatusOr<std::unique_ptr<Volume>> FaultPool::Open(const std::string& image) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kOpen, image));
  ASSIGN_OR_RETURN(std::unique_ptr<Volume> volume, inner_.Open(image));
  return std::unique_ptr<Volume>(
      std::make_unique<FaultVolume>(std::move(volume), inner_.name(), fault_));
}

Status FaultPool::Create(const std::string& image, uint64_t size) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kCreate, image));
  return inner_.Create(image, size);
}

Status FaultPool::Remove(const std::string& image) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kRemove, image));
  return inner_.Remove(image);
}

StatusOr<bool> FaultPool::Exists(const std::string& image) { return inner_.Exists(image); }

Status FaultPool::Rename(const std::string& from, const std::string& to) {
  return inner_.Rename(from, to);
}

Status FaultPool::Clone(const std::string& image, const std::string& snap,
                        const std::string& dest) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kClone, image, snap));
  return inner_.Clone(image, snap, dest);
}

Status FaultPool::Copy(const std::string& image, const std::string& snap, const std::string& dest,
                       const ProgressFn& progress) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kCopy, image, snap));
  return inner_.Copy(image, snap, dest, progress);
}

StatusOr<std::vector<std::string>> FaultPool::GroupImages(const std::string& group) {
  return inner_.GroupImages(group);
}

Status FaultPool::CreateGroupSnap(const std::string& group, const std::string& snap) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kCreateGroupSnap, group, snap));
  return inner_.CreateGroupSnap(group, snap);
}

Status FaultPool::RemoveGroupSnap(const std::string& group, const std::string& snap) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kRemoveGroupSnap, group, snap));
  return inner_.RemoveGroupSnap(group, snap);
}

StatusOr<std::vector<std::string>> FaultPool::GroupSnaps(const std::string& group) {
  return inner_.GroupSnaps(group);
}

Status FaultPool::JoinGroup(const std::string& group, const std::string& image) {
  return inner_.JoinGroup(group, image);
}

Status FaultPool::LeaveGroup(const std::string& group, const std::string& image) {
  return inner_.LeaveGroup(group, image);
}

// --- FaultVolume -------------------------------------------------------------

FaultVolume::FaultVolume(std::unique_ptr<Volume> inner, std::string pool_name,
                         std::shared_ptr<fault_internal::FaultSlot> fault)
    : inner_(std::move(inner)), pool_name_(std::move(pool_name)), fault_(std::move(fault)) {}

FaultVolume::~FaultVolume() = default;

StatusOr<uint64_t> FaultVolume::Size() { return inner_->Size(); }

Status FaultVolume::Resize(uint64_t new_size) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kResize, name()));
  return inner_->Resize(new_size);
}

StatusOr<std::vector<SnapInfo>> FaultVolume::ListSnaps() { return inner_->ListSnaps(); }

Status FaultVolume::CreateSnap(const std::string& snap, Writers writers) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kCreateSnap, name(), snap));
  return inner_->CreateSnap(snap, writers);
}

Status FaultVolume::RemoveSnap(const std::string& snap) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kRemoveSnap, name(), snap));
  return inner_->RemoveSnap(snap);
}

Status FaultVolume::RenameSnap(const std::string& from, const std::string& to) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kRenameSnap, name(), from));
  return inner_->RenameSnap(from, to);
}

Status FaultVolume::DiffExtents(const std::string& from_snap, const std::string& to_snap,
                                const std::function<Status(const Extent&)>& fn) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kDiff, name(), to_snap));
  return inner_->DiffExtents(from_snap, to_snap, fn);
}

StatusOr<std::unique_ptr<AsyncIo>> FaultVolume::OpenIo(const std::string& snap) {
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kOpenIo, name(), snap));
  ASSIGN_OR_RETURN(std::unique_ptr<AsyncIo> io, inner_->OpenIo(snap));
  return std::unique_ptr<AsyncIo>(
      std::make_unique<FaultAsyncIo>(std::move(io), pool_name_, name(), snap, fault_));
}

Status FaultVolume::ConfirmSnap(const std::string& snap, uint64_t snap_id) {
  return inner_->ConfirmSnap(snap, snap_id);
}

StatusOr<bool> FaultVolume::ChangedSince(const SnapInfo& snap) {
  return inner_->ChangedSince(snap);
}

void FaultVolume::CloseSnapshotHandles() { inner_->CloseSnapshotHandles(); }

void FaultVolume::CloseHandles() { inner_->CloseHandles(); }

// --- FaultAsyncIo ------------------------------------------------------------

FaultAsyncIo::FaultAsyncIo(std::unique_ptr<AsyncIo> inner, std::string pool, std::string image,
                           std::string snap, std::shared_ptr<fault_internal::FaultSlot> fault)
    : inner_(std::move(inner)),
      pool_(std::move(pool)),
      image_(std::move(image)),
      snap_(std::move(snap)),
      fault_(std::move(fault)) {}

FaultAsyncIo::~FaultAsyncIo() = default;

bool FaultAsyncIo::Faulted(VolumeOp op, uint64_t tag, uint64_t offset, uint64_t length) {
  const Status fault = fault_->Check(op, image_, snap_, offset, length);
  if (fault.ok()) return false;
  const char* verb = op == VolumeOp::kRead    ? "reading"
                     : op == VolumeOp::kWrite ? "writing"
                                              : "zeroing";
  started_.push_back(Completion{
      tag, fault.Annotate(fmt::format("{} {}/{}{}{} at {}~{}", verb, pool_, image_,
                                      snap_.empty() ? "" : "@", snap_, offset, length))});
  return true;
}

Status FaultAsyncIo::StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) {
  if (Faulted(VolumeOp::kRead, tag, offset, buf.size())) return OkStatus();
  RETURN_IF_ERROR(inner_->StartRead(tag, offset, buf));
  started_.emplace_back();
  return OkStatus();
}

Status FaultAsyncIo::StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) {
  if (Faulted(VolumeOp::kWrite, tag, offset, buf.size())) {
    ++faulted_writes_;
    return OkStatus();
  }
  RETURN_IF_ERROR(inner_->StartWrite(tag, offset, buf));
  started_.emplace_back();
  return OkStatus();
}

Status FaultAsyncIo::StartZero(uint64_t tag, uint64_t offset, uint64_t length) {
  if (Faulted(VolumeOp::kZero, tag, offset, length)) return OkStatus();
  RETURN_IF_ERROR(inner_->StartZero(tag, offset, length));
  started_.emplace_back();
  return OkStatus();
}

AsyncIo::Completion FaultAsyncIo::WaitOne() {
  assert(!started_.empty() && "WaitOne with nothing in flight");
  std::optional<Completion> first = std::move(started_.front());
  started_.pop_front();
  // The oldest is the wrapped store's: any of its operations stands for it.
  return first ? std::move(*first) : inner_->WaitOne();
}

AsyncIo::WriteStats FaultAsyncIo::write_stats() const {
  WriteStats stats = inner_->write_stats();
  stats.writes += faulted_writes_;
  return stats;
}

Status FaultAsyncIo::Drain() {
  RETURN_IF_ERROR(WaitAll());
  RETURN_IF_ERROR(fault_->Check(VolumeOp::kDrain, image_, snap_));
  return inner_->Drain();
}

}  // namespace cairn
