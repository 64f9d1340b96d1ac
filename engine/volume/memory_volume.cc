#include "engine/volume/memory_volume.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "engine/volume/memory_state.h"

namespace cairn {

namespace {

using memory_internal::Chunk;
using memory_internal::ChunkMap;
using memory_internal::FindSnap;
using memory_internal::FindSnapById;
using memory_internal::ImageState;
using memory_internal::PoolState;
using memory_internal::SnapState;

// Drops every byte at or beyond `size`, so that growing again reads zeros.
void TruncateChunks(ChunkMap& chunks, uint64_t chunk_size, uint64_t size) {
  const uint64_t first_dropped = (size + chunk_size - 1) / chunk_size;
  chunks.erase(chunks.lower_bound(first_dropped), chunks.end());
  if (size % chunk_size != 0) {
    auto it = chunks.find(size / chunk_size);
    if (it != chunks.end()) {
      std::string data = *it->second;
      std::memset(data.data() + size % chunk_size, 0, chunk_size - size % chunk_size);
      it->second = std::make_shared<const std::string>(std::move(data));
    }
  }
}

uint64_t AllocatedBytesOf(const ChunkMap& chunks, uint64_t chunk_size) {
  return chunks.size() * chunk_size;
}

int64_t SystemNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Status ImageNotFound(const PoolState& pool, const std::string& image) {
  return NotFound(fmt::format("image {}/{} does not exist", pool.name, image));
}

Status SnapNotFound(const PoolState& pool, const std::string& image, const std::string& snap) {
  return NotFound(fmt::format("snapshot {}/{}@{} does not exist", pool.name, image, snap));
}

// A share of a group snapshot comes and goes only with the group's.
Status GroupShare(const PoolState& pool, const std::string& image, const std::string& snap) {
  return InvalidArgument(fmt::format(
      "{}/{}@{} names a group snapshot: it is created, removed and renamed only with its group",
      pool.name, image, snap));
}

// Looks up a live image. REQUIRES: pool.mu held.
StatusOr<std::shared_ptr<ImageState>> FindImage(PoolState& pool, const std::string& image) {
  auto it = pool.images.find(image);
  if (it == pool.images.end()) return ImageNotFound(pool, image);
  return it->second;
}

}  // namespace

// --- MemoryPool ------------------------------------------------------------

MemoryPool::MemoryPool(std::string name, MemoryPoolOptions options) {
  assert(std::has_single_bit(options.chunk_size) && options.chunk_size >= 512);
  if (!options.now_ns) options.now_ns = SystemNowNs;
  state_ = std::make_shared<PoolState>(std::move(name), std::move(options));
}

MemoryPool::~MemoryPool() = default;

const std::string& MemoryPool::name() const { return state_->name; }

StatusOr<std::unique_ptr<Volume>> MemoryPool::Open(const std::string& image) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, image));
  return std::unique_ptr<Volume>(std::make_unique<MemoryVolume>(state_, std::move(state), image));
}

Status MemoryPool::Create(const std::string& image, uint64_t size) {
  if (image.empty()) return InvalidArgument("creating an image: empty name");
  std::lock_guard lock(state_->mu);
  if (state_->images.contains(image)) {
    return AlreadyExists(fmt::format("image {}/{} already exists", state_->name, image));
  }
  auto state = std::make_shared<ImageState>(image);
  state->size = size;
  state_->images.emplace(image, std::move(state));
  return OkStatus();
}

Status MemoryPool::SetOtherClients(const std::string& image, std::vector<std::string> clients) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, image));
  state->other_clients = std::move(clients);
  return OkStatus();
}

Status MemoryPool::Rename(const std::string& from, const std::string& to) {
  if (to.empty()) return InvalidArgument("renaming an image: empty name");
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, from));
  if (state_->images.contains(to)) {
    return AlreadyExists(fmt::format("image {}/{} already exists", state_->name, to));
  }
  state_->images.erase(from);
  state->name = to;
  state_->images.emplace(to, std::move(state));
  return OkStatus();
}

Status MemoryPool::Remove(const std::string& image) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, image));
  if (state->head_handles > 0) {
    return FailedPrecondition(fmt::format("removing image {}/{}: it is still open ({} handles)",
                                          state_->name, image, state->head_handles));
  }
  for (const auto& s : state->snaps) {
    if (s.clones > 0) {
      return FailedPrecondition(fmt::format(
          "removing image {}/{}: snapshot {} has {} clone(s) that depend on it; remove or "
          "flatten them first",
          state_->name, image, s.name, s.clones));
    }
  }
  if (state->parent) {
    if (SnapState* s = FindSnapById(*state->parent, state->parent_snap_id)) --s->clones;
    state->parent.reset();
  }
  state->removed = true;
  state->group.clear();
  state->snaps.clear();
  state->head.clear();
  state_->images.erase(image);
  return OkStatus();
}

StatusOr<bool> MemoryPool::Exists(const std::string& image) {
  std::lock_guard lock(state_->mu);
  return state_->images.contains(image);
}

Status MemoryPool::Clone(const std::string& image, const std::string& snap,
                         const std::string& dest) {
  if (snap.empty()) return InvalidArgument("cloning " + image + ": a snapshot is required");
  if (dest.empty()) return InvalidArgument("cloning " + image + ": empty destination name");
  if (IsGroupSnapName(snap)) {
    return InvalidArgument(
        fmt::format("cloning {}/{}@{}: librbd clones only from user snapshots, not group snapshots",
                    state_->name, image, snap));
  }
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> parent, FindImage(*state_, image));
  SnapState* s = FindSnap(*parent, snap);
  if (s == nullptr) return SnapNotFound(*state_, image, snap);
  if (state_->images.contains(dest)) {
    return AlreadyExists(fmt::format("image {}/{} already exists", state_->name, dest));
  }
  auto child = std::make_shared<ImageState>(dest);
  child->size = s->size;
  child->head = s->chunks;
  child->parent = parent;
  child->parent_snap_id = s->id;
  ++s->clones;
  state_->images.emplace(dest, std::move(child));
  return OkStatus();
}

Status MemoryPool::Copy(const std::string& image, const std::string& snap, const std::string& dest,
                        const ProgressFn& progress) {
  if (snap.empty()) return InvalidArgument("copying " + image + ": a snapshot is required");
  if (dest.empty()) return InvalidArgument("copying " + image + ": empty destination name");
  uint64_t size = 0;
  {
    std::lock_guard lock(state_->mu);
    ASSIGN_OR_RETURN(std::shared_ptr<ImageState> src, FindImage(*state_, image));
    SnapState* s = FindSnap(*src, snap);
    if (s == nullptr) return SnapNotFound(*state_, image, snap);
    if (state_->images.contains(dest)) {
      return AlreadyExists(fmt::format("image {}/{} already exists", state_->name, dest));
    }
    auto copy = std::make_shared<ImageState>(dest);
    copy->size = size = s->size;
    copy->head = s->chunks;
    state_->images.emplace(dest, std::move(copy));
  }
  if (progress) {
    progress(0, size);
    progress(size, size);
  }
  return OkStatus();
}

StatusOr<uint64_t> MemoryPool::AllocatedBytes(const std::string& image, const std::string& snap) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, image));
  if (snap.empty()) return AllocatedBytesOf(state->head, state_->options.chunk_size);
  SnapState* s = FindSnap(*state, snap);
  if (s == nullptr) return SnapNotFound(*state_, image, snap);
  return AllocatedBytesOf(s->chunks, state_->options.chunk_size);
}

Status MemoryPool::RotByte(const std::string& image, const std::string& snap, uint64_t offset) {
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, image));
  ChunkMap* chunks = &state->head;
  if (!snap.empty()) {
    SnapState* s = FindSnap(*state, snap);
    if (s == nullptr) return SnapNotFound(*state_, image, snap);
    chunks = &s->chunks;
  }
  const uint64_t size = state_->options.chunk_size;
  auto it = chunks->find(offset / size);  // keyed by chunk index
  if (it == chunks->end()) {
    return NotFound(
        fmt::format("{}/{}@{} holds no chunk at {}", state_->name, image, snap, offset));
  }
  // Chunks are immutable by contract; rot is what breaks contracts.
  auto& bytes = const_cast<std::string&>(*it->second);
  bytes[offset % size] = static_cast<char>(~bytes[offset % size]);
  return OkStatus();
}

// --- MemoryVolume ----------------------------------------------------------

MemoryVolume::MemoryVolume(std::shared_ptr<PoolState> pool, std::shared_ptr<ImageState> image,
                           std::string name)
    : pool_(std::move(pool)), image_(std::move(image)), name_(std::move(name)) {}

MemoryVolume::~MemoryVolume() {
  std::lock_guard lock(pool_->mu);
  if (holds_head_) --image_->head_handles;
}

void MemoryVolume::CloseHandles() {
  std::lock_guard lock(pool_->mu);
  if (holds_head_) --image_->head_handles;
  holds_head_ = false;
}

void MemoryVolume::HoldHeadLocked() {
  if (holds_head_) return;
  holds_head_ = true;
  ++image_->head_handles;
}

StatusOr<uint64_t> MemoryVolume::Size() {
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  return image_->size;
}

Status MemoryVolume::Resize(uint64_t new_size) {
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  HoldHeadLocked();
  if (new_size < image_->size) TruncateChunks(image_->head, pool_->options.chunk_size, new_size);
  image_->size = new_size;
  return OkStatus();
}

StatusOr<std::vector<SnapInfo>> MemoryVolume::ListSnaps() {
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  std::vector<SnapInfo> out;
  out.reserve(image_->snaps.size());
  for (const auto& s : image_->snaps) out.push_back({s.name, s.id, s.size, s.time_ns});
  return out;
}

Status MemoryVolume::CreateSnap(const std::string& snap, Writers) {
  if (snap.empty()) return InvalidArgument("creating a snapshot of " + name_ + ": empty name");
  if (IsGroupSnapName(snap)) return GroupShare(*pool_, name_, snap);
  const int64_t now = pool_->options.now_ns();
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  HoldHeadLocked();
  if (FindSnap(*image_, snap) != nullptr) {
    return AlreadyExists(fmt::format("snapshot {}/{}@{} already exists", pool_->name, name_, snap));
  }
  image_->snaps.push_back({snap, pool_->next_snap_id++, image_->size, now, image_->head, 0});
  return OkStatus();
}

Status MemoryVolume::RemoveSnap(const std::string& snap) {
  if (IsGroupSnapName(snap)) return GroupShare(*pool_, name_, snap);
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  HoldHeadLocked();
  auto it = std::find_if(image_->snaps.begin(), image_->snaps.end(),
                         [&](const SnapState& s) { return s.name == snap; });
  if (it == image_->snaps.end()) return SnapNotFound(*pool_, name_, snap);
  if (it->clones > 0) {
    return FailedPrecondition(fmt::format(
        "removing snapshot {}/{}@{}: {} clone(s) depend on it; remove or flatten them first",
        pool_->name, name_, snap, it->clones));
  }
  image_->snaps.erase(it);
  return OkStatus();
}

Status MemoryVolume::RenameSnap(const std::string& from, const std::string& to) {
  if (IsGroupSnapName(from)) return GroupShare(*pool_, name_, from);
  if (IsGroupSnapName(to)) return GroupShare(*pool_, name_, to);
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  SnapState* s = FindSnap(*image_, from);
  if (s == nullptr) return SnapNotFound(*pool_, name_, from);
  if (FindSnap(*image_, to) != nullptr) {
    return AlreadyExists(fmt::format("snapshot {}/{}@{} already exists", pool_->name, name_, to));
  }
  s->name = to;
  return OkStatus();
}

StatusOr<std::vector<std::string>> MemoryVolume::OtherClients() {
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  return image_->other_clients;
}

Status MemoryVolume::DiffExtents(const std::string& from_snap, const std::string& to_snap,
                                 const std::function<Status(const Extent&)>& fn) {
  if (IsGroupSnapName(from_snap)) {
    return InvalidArgument(
        fmt::format("diffing {}/{} from {}: a diff starts at a user snapshot, not a group snapshot",
                    pool_->name, name_, from_snap));
  }
  ChunkMap from;
  ChunkMap to;
  uint64_t to_size = 0;
  {
    std::lock_guard lock(pool_->mu);
    if (image_->removed) return ImageNotFound(*pool_, name_);
    uint64_t from_id = 0;
    uint64_t to_id = UINT64_MAX;  // the head is newer than every snapshot
    if (!from_snap.empty()) {
      SnapState* s = FindSnap(*image_, from_snap);
      if (s == nullptr) return SnapNotFound(*pool_, name_, from_snap);
      from_id = s->id;
      from = s->chunks;
    }
    if (to_snap.empty()) {
      to = image_->head;
      to_size = image_->size;
    } else {
      SnapState* s = FindSnap(*image_, to_snap);
      if (s == nullptr) return SnapNotFound(*pool_, name_, to_snap);
      to_id = s->id;
      to = s->chunks;
      to_size = s->size;
    }
    if (from_id > to_id) {
      return InvalidArgument(fmt::format("diffing {}/{}: snapshot {} is newer than {}", pool_->name,
                                         name_, from_snap, to_snap));
    }
    if (from_id == to_id) return OkStatus();
  }

  // Walk both sorted maps together, outside the lock: `fn` may use the pool.
  const uint64_t cs = pool_->options.chunk_size;
  const uint64_t end_index = (to_size + cs - 1) / cs;
  ExtentMerger merger(fn);
  auto f = from.begin();
  auto t = to.begin();
  while (true) {
    const uint64_t fi = f != from.end() ? f->first : UINT64_MAX;
    const uint64_t ti = t != to.end() ? t->first : UINT64_MAX;
    const uint64_t index = std::min(fi, ti);
    if (index >= end_index) break;
    std::optional<RecordKind> kind;
    if (fi == ti) {
      if (f->second != t->second && *f->second != *t->second) kind = RecordKind::kData;
      ++f;
      ++t;
    } else if (ti < fi) {
      kind = RecordKind::kData;
      ++t;
    } else {
      kind = RecordKind::kZero;
      ++f;
    }
    if (!kind) continue;
    const uint64_t offset = index * cs;
    RETURN_IF_ERROR(merger.Add({offset, std::min(cs, to_size - offset), *kind}));
  }
  return merger.Flush();
}

StatusOr<std::unique_ptr<AsyncIo>> MemoryVolume::OpenIo(const std::string& snap) {
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  uint64_t snap_id = 0;
  uint64_t snap_size = 0;
  if (!snap.empty()) {
    SnapState* s = FindSnap(*image_, snap);
    if (s == nullptr) return SnapNotFound(*pool_, name_, snap);
    snap_id = s->id;
    snap_size = s->size;
  } else {
    HoldHeadLocked();
    ++image_->head_handles;  // the AsyncIo's, until it goes
  }
  return memory_internal::NewMemoryAsyncIo(pool_, image_, snap, snap_id, snap_size);
}

StatusOr<bool> MemoryVolume::ChangedSince(const SnapInfo& snap) {
  std::lock_guard lock(pool_->mu);
  if (image_->removed) return ImageNotFound(*pool_, name_);
  const SnapState* s = FindSnapById(*image_, snap.id);
  if (s == nullptr || s->name != snap.name) return SnapNotFound(*pool_, name_, snap.name);
  return s->size != image_->size || s->chunks != image_->head;
}

Status MemoryVolume::ConfirmSnap(const std::string& snap, uint64_t snap_id) {
  std::lock_guard lock(pool_->mu);
  auto it = pool_->images.find(name_);
  if (image_->removed || it == pool_->images.end() || it->second != image_) {
    return NotFound(fmt::format("image {}/{} was removed, renamed or replaced while it was read",
                                pool_->name, name_));
  }
  const SnapState* s = FindSnapById(*image_, snap_id);
  if (s == nullptr || s->name != snap) {
    return NotFound(
        fmt::format("snapshot {}/{}@{} was removed while it was read", pool_->name, name_, snap));
  }
  return OkStatus();
}

}  // namespace cairn
