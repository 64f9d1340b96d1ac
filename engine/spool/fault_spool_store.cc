#include "engine/spool/fault_spool_store.h"

#include <algorithm>
#include <mutex>

namespace cairn {

namespace fault_internal {

class SpoolFaultSlot {
 public:
  void Set(SpoolFaultFn fn) {
    std::lock_guard lock(mu_);
    fn_ = std::make_shared<const SpoolFaultFn>(std::move(fn));
  }
  // Asked with no lock held: the hook may block or use the store.
  SpoolFault Ask(const SpoolFaultPoint& point) const {
    std::shared_ptr<const SpoolFaultFn> fn;
    {
      std::lock_guard lock(mu_);
      fn = fn_;
    }
    if (!fn || !*fn) return {};
    return (*fn)(point);
  }

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const SpoolFaultFn> fn_;
};

}  // namespace fault_internal

namespace {

using fault_internal::SpoolFaultSlot;

class FaultSpoolWriter final : public SpoolWriter {
 public:
  FaultSpoolWriter(std::unique_ptr<SpoolWriter> inner, SpoolStore& store, std::string volume,
                   uint64_t seq, SpoolOptions options, std::shared_ptr<SpoolFaultSlot> fault)
      : inner_(std::move(inner)),
        store_(store),
        volume_(std::move(volume)),
        seq_(seq),
        options_(options),
        fault_(std::move(fault)),
        synced_(inner_->appended()) {}

  Status Append(std::span<const char> header, std::string_view body,
                std::span<const char> payload) override {
    RETURN_IF_ERROR(error_);
    const uint64_t n = header.size() + body.size() + payload.size();
    SpoolFault f = fault_->Ask({SpoolOp::kAppend, volume_, seq_, inner_->appended(), n});
    if (!f.status.ok()) {
      if (f.status.reason() != Reason::kSpoolQuota) error_ = f.status;
      return f.status;
    }
    return inner_->Append(header, body, payload);
  }

  StatusOr<uint64_t> Sync() override {
    RETURN_IF_ERROR(error_);
    const uint64_t appended = inner_->appended();
    SpoolFault f = fault_->Ask({SpoolOp::kSync, volume_, seq_, synced_, appended - synced_});
    if (f.status.ok()) {
      ASSIGN_OR_RETURN(synced_, inner_->Sync());
      return synced_;
    }
    error_ = f.status;
    if (f.tear) Tear(synced_ + std::min(*f.tear, appended - synced_));
    return error_;
  }

  Status SyncWritten() override { return inner_ ? inner_->SyncWritten() : OkStatus(); }

  uint64_t appended() const override { return inner_ ? inner_->appended() : torn_at_; }

 private:
  // Leaves exactly `end` bytes of frames durable (then zeros to a block):
  // all of it synced, then cut back through the store's own Resume.
  void Tear(uint64_t end) {
    (void)inner_->Sync();
    inner_.reset();
    torn_at_ = end;
    auto w = store_.Resume(volume_, seq_, end, options_);
    if (w.ok()) (void)(*w)->Sync();
  }

  std::unique_ptr<SpoolWriter> inner_;
  SpoolStore& store_;
  const std::string volume_;
  const uint64_t seq_;
  const SpoolOptions options_;
  const std::shared_ptr<SpoolFaultSlot> fault_;
  uint64_t synced_;  // frame bytes durable (or the resume point)
  uint64_t torn_at_ = 0;
  Status error_;  // the fault that failed the writer; returned from then on
};

}  // namespace

FaultSpoolStore::FaultSpoolStore(SpoolStore& inner)
    : inner_(inner), fault_(std::make_shared<fault_internal::SpoolFaultSlot>()) {}

FaultSpoolStore::~FaultSpoolStore() = default;

void FaultSpoolStore::SetFault(SpoolFaultFn fn) { fault_->Set(std::move(fn)); }

StatusOr<std::unique_ptr<SpoolWriter>> FaultSpoolStore::Create(const std::string& volume,
                                                               uint64_t seq,
                                                               const SpoolOptions& options) {
  if (SpoolFault f = fault_->Ask({SpoolOp::kCreate, volume, seq}); !f.status.ok()) return f.status;
  ASSIGN_OR_RETURN(auto w, inner_.Create(volume, seq, options));
  return std::unique_ptr<SpoolWriter>(
      new FaultSpoolWriter(std::move(w), inner_, volume, seq, options, fault_));
}

StatusOr<std::unique_ptr<SpoolWriter>> FaultSpoolStore::Resume(const std::string& volume,
                                                               uint64_t seq, uint64_t logical_end,
                                                               const SpoolOptions& options) {
  if (SpoolFault f = fault_->Ask({SpoolOp::kResume, volume, seq, logical_end}); !f.status.ok()) {
    return f.status;
  }
  ASSIGN_OR_RETURN(auto w, inner_.Resume(volume, seq, logical_end, options));
  return std::unique_ptr<SpoolWriter>(
      new FaultSpoolWriter(std::move(w), inner_, volume, seq, options, fault_));
}

StatusOr<std::unique_ptr<SpoolReader>> FaultSpoolStore::Open(const std::string& volume,
                                                             uint64_t seq) {
  if (SpoolFault f = fault_->Ask({SpoolOp::kOpen, volume, seq}); !f.status.ok()) return f.status;
  return inner_.Open(volume, seq);
}

StatusOr<std::vector<uint64_t>> FaultSpoolStore::List(const std::string& volume) {
  return inner_.List(volume);
}

StatusOr<std::vector<std::string>> FaultSpoolStore::Volumes() { return inner_.Volumes(); }

Status FaultSpoolStore::Remove(const std::string& volume, uint64_t seq) {
  if (SpoolFault f = fault_->Ask({SpoolOp::kRemove, volume, seq}); !f.status.ok()) return f.status;
  return inner_.Remove(volume, seq);
}

Status FaultSpoolStore::AddVolume(const std::string& volume) { return inner_.AddVolume(volume); }

uint64_t FaultSpoolStore::FreeBytes() { return inner_.FreeBytes(); }

Status FaultSpoolStore::CheckWritable(const std::string& volume) {
  return inner_.CheckWritable(volume);
}

std::string FaultSpoolStore::where() const { return inner_.where(); }

}  // namespace cairn
