// RbdVolume: one image's handles (opened on need, checked to be the image
// opened), its size and snapshot list.

#include <endian.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/ceph/rbd_internal.h"

namespace cairn {

using namespace rbd_internal;  // the adapters' shared helpers (rbd_internal.h)

// --- RbdVolume ---------------------------------------------------------------

RbdVolume::RbdVolume(std::shared_ptr<RadosIoCtx> io, std::string id, std::string name,
                     std::shared_ptr<rbd_internal::SettleBook> book)
    : io_(std::move(io)), id_(std::move(id)), name_(std::move(name)), book_(std::move(book)) {}

RbdVolume::~RbdVolume() = default;

std::string RbdVolume::Spec(const std::string& snap) const {
  return ImageSpec(io_->pool(), name_, snap);
}

StatusOr<std::shared_ptr<Image>> RbdVolume::OpenSame(const std::string& snap, bool read_only) {
  ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, name_, snap, read_only));
  ASSIGN_OR_RETURN(const std::string id, ImageId(h->get(), Spec()));
  RETURN_IF_ERROR(SameIdAsOpened(id));
  return h;
}

StatusOr<std::shared_ptr<Image>> RbdVolume::Head() {
  if (!head_) {
    ASSIGN_OR_RETURN(head_, OpenSame("", false));
  }
  return head_;
}

StatusOr<std::shared_ptr<Image>> RbdVolume::HeadForReading() {
  if (head_) return head_;
  return OpenSame("", true);
}

StatusOr<std::shared_ptr<Image>> RbdVolume::AtSnap(const std::string& snap) {
  if (!snap_ || snap_name_ != snap) {
    snap_.reset();
    ASSIGN_OR_RETURN(snap_, OpenSame(snap, true));
    snap_name_ = snap;
  }
  return snap_;
}

void RbdVolume::CloseSnapshotHandles() {
  snap_.reset();
  snap_name_.clear();
}

void RbdVolume::CloseHandles() {
  CloseSnapshotHandles();
  head_.reset();
}

StatusOr<uint64_t> RbdVolume::Size() {
  ASSIGN_OR_RETURN(auto h, HeadForReading());
  return ImageSize(h->get(), Spec());
}

Status RbdVolume::Resize(uint64_t new_size) {
  ASSIGN_OR_RETURN(auto h, Head());
  if (int rc = rbd_resize(h->get(), new_size); rc < 0) {
    return ErrnoStatus(rc, fmt::format("resizing {} to {} bytes", Spec(), new_size));
  }
  return OkStatus();
}

StatusOr<std::vector<SnapInfo>> RbdVolume::ListSnaps() {
  RETURN_IF_ERROR(CheckSameImage());
  return ListSnapsOfHeader(io_->get(), id_, Spec());
}

Status RbdVolume::CheckSameImage() const {
  ASSIGN_OR_RETURN(const std::string id, ReadImageId(io_->get(), name_, Spec()));
  return SameIdAsOpened(id);
}

Status RbdVolume::SameIdAsOpened(const std::string& id) const {
  if (id == id_) return OkStatus();
  return NotFound(
      fmt::format("image {} is no longer the image opened (id {}, now {}): it was "
                  "removed or renamed and another created under its name",
                  Spec(), id_, id));
}

}  // namespace cairn
