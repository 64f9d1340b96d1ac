// Sparse copies of an image (CopyData): what a full restore runs.
#include <algorithm>
#include <array>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "engine/ceph/rbd_aio.h"
#include "engine/ceph/rbd_internal.h"

namespace cairn::rbd_internal {

static bool AllZero(const char* p, size_t n) {
  static const char kZeros[4096] = {};
  while (n > 0) {
    const size_t k = std::min(n, sizeof kZeros);
    if (std::memcmp(p, kZeros, k) != 0) return false;
    p += k;
    n -= k;
  }
  return true;
}

// One copy of the allocated data of `src` (read-only, at its snapshot) into
// the fresh image `dst`: kCopySlots pieces in flight, each read into its
// slot's buffer and then written from it. Progress is reported up to the
// oldest piece not yet written.
class ImageCopy {
 public:
  ImageCopy(rbd_image_t src, rbd_image_t dst, std::string src_spec, const std::string& dst_spec,
            uint64_t size, const ProgressFn& progress)
      : src_(src),
        dst_(dst),
        src_spec_(std::move(src_spec)),
        dst_spec_(dst_spec),
        size_(size),
        progress_(progress) {
    for (size_t i = kCopySlots; i > 0; --i) free_slots_.push_back(i - 1);
  }

  // Starts the reads of data extent `e`, a piece at a time, as slots free.
  Status CopyExtent(const Extent& e) {
    if (e.kind != RecordKind::kData) return OkStatus();
    const uint64_t end = e.offset + e.length;
    for (uint64_t pos = e.offset; pos < end;) {
      const uint64_t n = std::min(kCopyPiece - pos % kCopyPiece, end - pos);
      while (free_slots_.empty()) HandleOne();
      if (!first_.ok()) return first_;
      const size_t slot = free_slots_.back();
      if (bufs_[slot].empty()) bufs_[slot].resize(kCopyPiece);
      RETURN_IF_ERROR(
          StartOp(src_, queue_, OpKind::kRead, slot, pos, n, bufs_[slot].data(), src_spec_));
      free_slots_.pop_back();
      ++in_flight_;
      outstanding_.insert(pos);
      pos += n;
      issued_to_ = pos;
    }
    return OkStatus();
  }

  // Waits for every piece started: none may outlive its buffer.
  void WaitAll() {
    while (in_flight_ > 0) HandleOne();
  }

  // REQUIRES: WaitAll. Flushes `dst` if every piece was copied, and reports
  // the whole size done.
  Status Finish() {
    RETURN_IF_ERROR(first_);
    if (int rc = rbd_flush(dst_); rc < 0) return ErrnoStatus(rc, "flushing " + dst_spec_);
    issued_to_ = size_;
    Report();
    return OkStatus();
  }

 private:
  // Pops one completion: a finished read starts its write; a finished write
  // frees its slot. The tag is the slot.
  void HandleOne() {
    PendingOp* op = queue_.Pop();
    --in_flight_;
    const OpKind kind = op->kind;
    const uint64_t offset = op->offset;
    const uint64_t length = op->length;
    const AsyncIo::Completion c = FinishOp(op, kind == OpKind::kRead ? src_spec_ : dst_spec_);
    const size_t slot = c.tag;
    if (!c.status.ok()) {
      if (first_.ok()) first_ = c.status;
      Release(slot, offset);
      return;
    }
    if (kind == OpKind::kRead && first_.ok() && !AllZero(bufs_[slot].data(), length)) {
      Status st = StartOp(dst_, queue_, OpKind::kWrite, slot, offset, length, bufs_[slot].data(),
                          dst_spec_);
      if (st.ok()) {
        ++in_flight_;
        return;
      }
      first_ = st;
    }
    Release(slot, offset);  // written, or all zeros (the new image reads zeros already)
  }

  void Report() {
    const uint64_t done = outstanding_.empty() ? issued_to_ : *outstanding_.begin();
    if (progress_ && done > reported_) {
      reported_ = done;
      progress_(done, size_);
    }
  }

  void Release(size_t slot, uint64_t offset) {
    free_slots_.push_back(slot);
    outstanding_.erase(offset);
    Report();
  }

  rbd_image_t src_;
  rbd_image_t dst_;
  const std::string src_spec_;
  const std::string& dst_spec_;
  const uint64_t size_;
  const ProgressFn& progress_;
  CompletionQueue queue_;
  std::array<std::vector<char>, kCopySlots> bufs_;
  std::vector<size_t> free_slots_;
  size_t in_flight_ = 0;
  Status first_;
  std::set<uint64_t> outstanding_;  // offsets of pieces not yet written
  uint64_t issued_to_ = 0;          // end of the last piece started
  uint64_t reported_ = 0;
};

// Copies the allocated data of `src` (read-only, at its snapshot) into the
// fresh image `dst`, kCopySlots pieces in flight.
Status CopyData(rbd_image_t src, rbd_image_t dst, const std::string& pool,
                const std::string& src_image, const std::string& snap, const std::string& dst_spec,
                uint64_t size, const ProgressFn& progress) {
  ImageCopy copy(src, dst, ImageSpec(pool, src_image, snap), dst_spec, size, progress);
  if (progress) progress(0, size);
  Status listed = DiffImage(src, pool, src_image, "", snap,
                            [&](const Extent& e) { return copy.CopyExtent(e); });
  copy.WaitAll();  // never leave librbd with our buffers
  RETURN_IF_ERROR(listed);
  return copy.Finish();
}

}  // namespace cairn::rbd_internal
