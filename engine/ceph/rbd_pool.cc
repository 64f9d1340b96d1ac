// RbdPool: the images of one pool (open, create, remove, rename, clone,
// copy).

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

// --- RbdPool -----------------------------------------------------------------

RbdPool::RbdPool(std::shared_ptr<RadosIoCtx> io, RbdPoolOptions options)
    : io_(std::move(io)), options_(options), book_(std::make_shared<rbd_internal::SettleBook>()) {}

std::string RbdPool::Spec(const std::string& image, const std::string& snap) const {
  return ImageSpec(io_->pool(), image, snap);
}

StatusOr<std::unique_ptr<Volume>> RbdPool::Open(const std::string& image) {
  // No image is opened here: the id comes from the image's id object. A
  // read-write handle is opened only when an operation needs it (see
  // RbdVolume::Head): it holds a watch, and the watch of a process killed
  // with -9 stalls every snapshot of the image for ~30 s.
  ASSIGN_OR_RETURN(std::string id, ReadImageId(io_->get(), image, Spec(image)));
  return std::unique_ptr<Volume>(std::make_unique<RbdVolume>(io_, std::move(id), image, book_));
}

namespace {

// Creates `image` with the given features and order.
Status CreateImage(const RadosIoCtx& io, const std::string& image, uint64_t size, uint64_t features,
                   int order) {
  rbd_image_options_t opts;
  rbd_image_options_create(&opts);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FORMAT, 2);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES, features);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_ORDER, static_cast<uint64_t>(order));
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_create4(io.get(), image.c_str(), size, opts);
  }();
  rbd_image_options_destroy(opts);
  if (rc == -EEXIST) {
    return AlreadyExists(fmt::format("image {} already exists", ImageSpec(io.pool(), image)));
  }
  if (rc < 0) {
    return ErrnoStatus(
        rc, fmt::format("creating image {} of {} bytes", ImageSpec(io.pool(), image), size));
  }
  return OkStatus();
}

// librbd refuses to remove an image of a group, or one that holds shares of
// group snapshots; RbdPool::Remove asks first, so that it removes no user
// snapshot of an image it then cannot remove.
Status CheckNoGroup(rbd_image_t h, const std::string& spec) {
  rbd_group_info_t group{};
  if (int rc = rbd_get_group(h, &group, sizeof group); rc < 0) {
    return ErrnoStatus(rc, "getting the group of " + spec);
  }
  const std::string name = group.name != nullptr ? group.name : "";
  const bool in_group = group.pool >= 0;
  rbd_group_info_cleanup(&group, sizeof group);
  if (in_group) {
    return FailedPrecondition(fmt::format(
        "removing image {}: it is in group {}; take it out first (rbd group image remove)", spec,
        name));
  }
  ASSIGN_OR_RETURN(std::vector<RawSnap> snaps, ListAllSnapsOf(h, spec));
  for (const auto& s : snaps) {
    rbd_snap_namespace_type_t type{};
    if (int rc = rbd_snap_get_namespace_type(h, s.id, &type); rc < 0) {
      return ErrnoStatus(rc, "getting the namespace of a snapshot of " + spec);
    }
    if (type == RBD_SNAP_NAMESPACE_TYPE_GROUP) {
      return FailedPrecondition(fmt::format(
          "removing image {}: it holds a share of a group snapshot ({}); remove that with its "
          "group first",
          spec, s.name));
    }
  }
  return OkStatus();
}

}  // namespace

Status RbdPool::Create(const std::string& image, uint64_t size) {
  if (image.empty()) return InvalidArgument("creating an image in pool " + name() + ": empty name");
  return CreateImage(*io_, image, size, options_.features, options_.order);
}

StatusOr<bool> RbdPool::Exists(const std::string& image) {
  StatusOr<std::shared_ptr<Image>> h = OpenImage(*io_, image, "", true);
  if (h.ok()) return true;
  if (h.status().code() == Code::kNotFound) return false;
  return h.status();
}

Status RbdPool::Rename(const std::string& from, const std::string& to) {
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_rename(io_->get(), from.c_str(), to.c_str());
  }();
  if (rc == -ENOENT) return NotFound(fmt::format("image {} does not exist", Spec(from)));
  if (rc == -EEXIST) return AlreadyExists(fmt::format("image {} already exists", Spec(to)));
  if (rc < 0) return ErrnoStatus(rc, fmt::format("renaming {} to {}", Spec(from), to));
  return OkStatus();
}

Status RbdPool::Remove(const std::string& image) {
  const std::string spec = Spec(image);
  std::vector<SnapInfo> snaps;
  std::vector<bool> protected_snaps;
  {
    // Read-only: no watch of our own. Check everything before changing anything.
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, image, "", true));
    size_t max = 4;
    std::vector<rbd_image_watcher_t> watchers;
    int rc = 0;
    while (true) {
      watchers.assign(max, rbd_image_watcher_t{});
      rc = rbd_watchers_list(h->get(), watchers.data(), &max);
      if (rc != -ERANGE) break;
    }
    if (rc < 0) return ErrnoStatus(rc, "listing the clients of " + spec);
    rbd_watchers_list_cleanup(watchers.data(), max);
    if (max > 0) {
      return FailedPrecondition(
          fmt::format("removing image {}: {} client(s) have it open; close them first", spec, max));
    }
    RETURN_IF_ERROR(CheckNoGroup(h->get(), spec));
    ASSIGN_OR_RETURN(snaps, ListSnapsOf(h->get(), spec));
    for (const auto& s : snaps) {
      ASSIGN_OR_RETURN(bool prot, IsProtected(h->get(), spec, s.name));
      protected_snaps.push_back(prot);
      if (!prot) continue;
      ASSIGN_OR_RETURN(size_t clones, CountClones(*io_, image, s.name));
      if (clones > 0) {
        return ClonesDependOn(Spec(image, s.name), clones).Annotate("removing image " + spec);
      }
    }
  }
  if (!snaps.empty()) {
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, image, "", false));
    for (size_t i = 0; i < snaps.size(); ++i) {
      const std::string snap_spec = Spec(image, snaps[i].name);
      if (protected_snaps[i]) {
        const int rc = rbd_snap_unprotect(h->get(), snaps[i].name.c_str());
        if (rc < 0 && rc != -EINVAL) {  // EINVAL: no longer protected
          return ErrnoStatus(rc, "removing image " + spec + ": unprotecting " + snap_spec);
        }
      }
      const int rc = rbd_snap_remove(h->get(), snaps[i].name.c_str());
      if (rc < 0 && rc != -ENOENT) {
        return ErrnoStatus(rc, "removing image " + spec + ": removing " + snap_spec);
      }
    }
  }
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_remove(io_->get(), image.c_str());
  }();
  if (rc == -ENOENT) return NotFound(fmt::format("image {} does not exist", spec));
  if (rc == -EBUSY) {
    return FailedPrecondition(fmt::format("removing image {}: a client has it open", spec));
  }
  if (rc == -ENOTEMPTY) {
    return FailedPrecondition(fmt::format(
        "removing image {}: it has snapshots (one taken meanwhile, or a share of a group "
        "snapshot: remove that with the group)",
        spec));
  }
  if (rc == -EMLINK) {
    return FailedPrecondition(fmt::format(
        "removing image {}: it is in a group; take it out first (rbd group image remove)", spec));
  }
  if (rc < 0) return ErrnoStatus(rc, "removing image " + spec);
  return OkStatus();
}

Status RbdPool::Clone(const std::string& image, const std::string& snap, const std::string& dest) {
  if (snap.empty()) return InvalidArgument("cloning " + Spec(image) + ": a snapshot is required");
  if (dest.empty()) return InvalidArgument("cloning " + Spec(image) + ": empty destination name");
  const std::string spec = Spec(image, snap);
  if (IsGroupSnapName(snap)) {
    return InvalidArgument("cloning " + spec +
                           ": librbd clones only from user snapshots, not group snapshots");
  }
  ASSIGN_OR_RETURN(bool dest_exists, Exists(dest));
  if (dest_exists) return AlreadyExists(fmt::format("image {} already exists", Spec(dest)));
  {
    ASSIGN_OR_RETURN(std::shared_ptr<Image> h, OpenImage(*io_, image, "", false));
    bool exists = false;
    if (int rc = rbd_snap_exists(h->get(), snap.c_str(), &exists); rc < 0) {
      return ErrnoStatus(rc, "cloning " + spec);
    }
    if (!exists) return NotFound(fmt::format("snapshot {} does not exist", spec));
    ASSIGN_OR_RETURN(bool prot, IsProtected(h->get(), Spec(image), snap));
    if (!prot) {
      const int rc = rbd_snap_protect(h->get(), snap.c_str());
      if (rc < 0 && rc != -EBUSY) {  // EBUSY: protected meanwhile
        return ErrnoStatus(rc, "cloning " + spec + ": protecting the snapshot");
      }
    }
  }
  rbd_image_options_t opts;
  rbd_image_options_create(&opts);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FORMAT, 2);
  rbd_image_options_set_uint64(opts, RBD_IMAGE_OPTION_FEATURES,
                               options_.features | RBD_FEATURE_LAYERING);
  const int rc = [&] {
    const auto lock = rbd_internal::ImageContextLock();
    return rbd_clone3(io_->get(), image.c_str(), snap.c_str(), io_->get(), dest.c_str(), opts);
  }();
  rbd_image_options_destroy(opts);
  if (rc == -EEXIST) return AlreadyExists(fmt::format("image {} already exists", Spec(dest)));
  if (rc < 0) return ErrnoStatus(rc, fmt::format("cloning {} into {}", spec, Spec(dest)));
  return OkStatus();
}

Status RbdPool::Copy(const std::string& image, const std::string& snap, const std::string& dest,
                     const ProgressFn& progress) {
  if (snap.empty()) return InvalidArgument("copying " + Spec(image) + ": a snapshot is required");
  if (dest.empty()) return InvalidArgument("copying " + Spec(image) + ": empty destination name");
  const std::string what = fmt::format("copying {} to {}", Spec(image, snap), Spec(dest));
  ASSIGN_OR_RETURN(std::shared_ptr<Image> src, OpenImage(*io_, image, snap, true));
  ASSIGN_OR_RETURN(const uint64_t size, ImageSize(src->get(), Spec(image, snap)));
  ASSIGN_OR_RETURN(std::string src_id, ImageId(src->get(), Spec(image)));
  ASSIGN_OR_RETURN(const uint64_t snap_id, SnapIdOf(src->get(), snap, Spec(image)));
  rbd_image_info_t info{};
  if (int rc = rbd_stat(src->get(), &info, sizeof info); rc < 0) return ErrnoStatus(rc, what);
  RETURN_IF_ERROR(CreateImage(*io_, dest, size, options_.features, info.order));
  Status st;
  {
    StatusOr<std::shared_ptr<Image>> dst = OpenImage(*io_, dest, "", false);
    st = dst.ok() ? CopyData(src->get(), (*dst)->get(), io_->pool(), image, snap, Spec(dest), size,
                             progress)
                  : dst.status();
  }
  // What was read of a snapshot removed meanwhile may be zeros: the copy
  // stands only if the snapshot outlived it.
  if (st.ok()) st = RbdVolume(io_, std::move(src_id), image, book_).ConfirmSnap(snap, snap_id);
  if (!st.ok()) {
    const int rc = [&] {
      const auto lock = rbd_internal::ImageContextLock();
      return rbd_remove(io_->get(), dest.c_str());
    }();
    return st.Annotate(what + (rc == 0 ? " (the partial copy was removed)"
                                       : " (the partial copy could not be removed)"));
  }
  return OkStatus();
}

}  // namespace cairn
