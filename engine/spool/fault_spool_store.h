// FaultSpoolStore: a fault-injecting layer of the Spool seam
// (spool_store.h) that stacks on any SpoolStore, the in-memory twin or the
// files.
//
// Before Create, Resume, Open, Remove, and before every Append and Sync of
// a writer made through it, the layer asks a SpoolFaultFn. An OK fault lets
// the operation through to the wrapped store unchanged. Otherwise:
//  - Create, Resume, Open, Remove return the fault's status and do nothing;
//  - an Append returns it and does not reach the wrapped writer; the writer
//    is failed from then on (as after a full disk: Append and Sync return
//    the same status, SyncWritten makes what was appended before durable),
//    unless the status carries Reason kSpoolQuota (a refused frame leaves
//    the writer usable, as the quota does);
//  - a Sync returns it and the writer is failed. With `tear` set, the spool
//    is torn as a crash during the sync would leave it: the bytes synced
//    before and the first `*tear` bytes appended since are durable, zeros
//    follow up to the next 4 KiB boundary, the rest is lost.
// AddVolume, List, Volumes, FreeBytes and CheckWritable pass straight
// through.
//
// Ownership: a FaultSpoolStore does not own the store it wraps, which must
// outlive it and every writer and reader made through it.
//
// Thread-safety: thread-safe if the wrapped store is; SetFault may be
// called from any thread at any time. The SpoolFaultFn is called on the
// thread doing the operation, with no lock of this layer held.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "engine/spool/spool_store.h"

namespace cairn {

// Where a fault can be injected.
enum class SpoolOp { kCreate, kResume, kOpen, kRemove, kAppend, kSync };

struct SpoolFaultPoint {
  SpoolOp op;
  std::string volume;
  uint64_t seq = 0;
  // Append: frame bytes appended before this frame. Sync: bytes synced
  // before (for a resumed writer, counting from its resume point).
  uint64_t offset = 0;
  // Append: the frame's bytes. Sync: the bytes appended since `offset`.
  uint64_t length = 0;
};

struct SpoolFault {
  SpoolFault() = default;
  SpoolFault(Status s) : status(std::move(s)) {}  // NOLINT: a plain failure
  SpoolFault(Status s, uint64_t keep) : status(std::move(s)), tear(keep) {}

  Status status;                 // OK: no fault
  std::optional<uint64_t> tear;  // Sync only: bytes of the unsynced tail kept
};

// Returns the fault for the operation at `point`, OK to let it run.
using SpoolFaultFn = std::function<SpoolFault(const SpoolFaultPoint& point)>;

namespace fault_internal {
class SpoolFaultSlot;  // the fault of one FaultSpoolStore, shared with its writers
}  // namespace fault_internal

class FaultSpoolStore final : public SpoolStore {
 public:
  // REQUIRES: `inner` outlives this store and its writers and readers.
  explicit FaultSpoolStore(SpoolStore& inner);
  ~FaultSpoolStore() override;
  FaultSpoolStore(const FaultSpoolStore&) = delete;
  FaultSpoolStore& operator=(const FaultSpoolStore&) = delete;

  // Installs `fn`, consulted from now on by this store and every writer
  // made through it, before or after; an empty `fn` removes it.
  void SetFault(SpoolFaultFn fn);

  Status AddVolume(const std::string& volume) override;
  StatusOr<std::unique_ptr<SpoolWriter>> Create(const std::string& volume, uint64_t seq,
                                                const SpoolOptions& options) override;
  StatusOr<std::unique_ptr<SpoolWriter>> Resume(const std::string& volume, uint64_t seq,
                                                uint64_t logical_end,
                                                const SpoolOptions& options) override;
  StatusOr<std::unique_ptr<SpoolReader>> Open(const std::string& volume, uint64_t seq) override;
  StatusOr<std::vector<uint64_t>> List(const std::string& volume) override;
  StatusOr<std::vector<std::string>> Volumes() override;
  Status Remove(const std::string& volume, uint64_t seq) override;
  uint64_t FreeBytes() override;
  Status CheckWritable(const std::string& volume) override;
  std::string where() const override;

 private:
  SpoolStore& inner_;
  std::shared_ptr<fault_internal::SpoolFaultSlot> fault_;
};

}  // namespace cairn
