#include "engine/volume/memory_volume.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <utility>

namespace cairn {
namespace memory_internal {

// Exactly chunk_size bytes; never modified once shared.
using Chunk = std::shared_ptr<const std::string>;
// Chunk index -> chunk; only allocated chunks are present.
using ChunkMap = std::map<uint64_t, Chunk>;

struct SnapState {
  std::string name;
  uint64_t id = 0;
  uint64_t size = 0;
  int64_t time_ns = 0;
  ChunkMap chunks;
  int clones = 0;  // images cloned from this snapshot that still exist
};

struct ImageState {
  explicit ImageState(std::string n) : name(std::move(n)) {}
  std::string name;
  uint64_t size = 0;
  ChunkMap head;
  std::vector<SnapState> snaps;  // creation order, ids ascending
  // For a clone: the snapshot it pins.
  std::shared_ptr<ImageState> parent;
  uint64_t parent_snap_id = 0;
  // Volumes that used the head (a read-write handle on RBD: resize,
  // snapshots, head I/O) and head AsyncIos.
  int head_handles = 0;
  bool removed = false;
};

struct PoolState {
  PoolState(std::string n, MemoryPoolOptions o) : name(std::move(n)), options(std::move(o)) {}
  const std::string name;
  const MemoryPoolOptions options;
  std::mutex mu;
  std::map<std::string, std::shared_ptr<ImageState>> images;  // guarded by mu
  uint64_t next_snap_id = 1;                                  // guarded by mu
  MemoryFaultFn fault;                                        // guarded by mu
};

}  // namespace memory_internal

namespace {

using memory_internal::Chunk;
using memory_internal::ChunkMap;
using memory_internal::ImageState;
using memory_internal::PoolState;
using memory_internal::SnapState;

// Runs the pool's fault hook, if any, outside the pool's lock.
Status CheckFault(PoolState& pool, MemoryOp op, const std::string& image,
                  const std::string& snap = "", uint64_t offset = 0, uint64_t length = 0) {
  MemoryFaultFn fn;
  {
    std::lock_guard lock(pool.mu);
    fn = pool.fault;
  }
  if (!fn) return OkStatus();
  return fn(MemoryFaultPoint{op, image, snap, offset, length});
}

bool AllZero(const char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

SnapState* FindSnap(ImageState& image, const std::string& snap) {
  for (auto& s : image.snaps) {
    if (s.name == snap) return &s;
  }
  return nullptr;
}

SnapState* FindSnapById(ImageState& image, uint64_t id) {
  for (auto& s : image.snaps) {
    if (s.id == id) return &s;
  }
  return nullptr;
}

// Calls fn(chunk index, offset in chunk, offset in the request, length) for
// each chunk that [offset, offset+length) touches.
template <typename Fn>
void ForEachChunk(uint64_t chunk_size, uint64_t offset, uint64_t length, Fn&& fn) {
  uint64_t done = 0;
  while (done < length) {
    const uint64_t pos = offset + done;
    const uint64_t index = pos / chunk_size;
    const uint64_t in_chunk = pos % chunk_size;
    const uint64_t n = std::min(chunk_size - in_chunk, length - done);
    fn(index, in_chunk, done, n);
    done += n;
  }
}

void WriteChunks(ChunkMap& chunks, uint64_t chunk_size, uint64_t offset,
                 std::span<const char> buf) {
  ForEachChunk(chunk_size, offset, buf.size(),
               [&](uint64_t index, uint64_t in_chunk, uint64_t at, uint64_t n) {
                 auto it = chunks.find(index);
                 std::string data =
                     it != chunks.end() ? *it->second : std::string(chunk_size, '\0');
                 std::memcpy(data.data() + in_chunk, buf.data() + at, n);
                 chunks[index] = std::make_shared<const std::string>(std::move(data));
               });
}

void ZeroChunks(ChunkMap& chunks, uint64_t chunk_size, uint64_t offset, uint64_t length) {
  ForEachChunk(chunk_size, offset, length,
               [&](uint64_t index, uint64_t in_chunk, uint64_t, uint64_t n) {
                 auto it = chunks.find(index);
                 if (it == chunks.end()) return;
                 if (n == chunk_size) {
                   chunks.erase(it);
                   return;
                 }
                 std::string data = *it->second;
                 std::memset(data.data() + in_chunk, 0, n);
                 if (AllZero(data.data(), data.size())) {
                   chunks.erase(it);
                 } else {
                   it->second = std::make_shared<const std::string>(std::move(data));
                 }
               });
}

void ReadChunks(const ChunkMap& chunks, uint64_t chunk_size, uint64_t offset, std::span<char> buf) {
  ForEachChunk(chunk_size, offset, buf.size(),
               [&](uint64_t index, uint64_t in_chunk, uint64_t at, uint64_t n) {
                 auto it = chunks.find(index);
                 if (it == chunks.end()) {
                   std::memset(buf.data() + at, 0, n);
                 } else {
                   std::memcpy(buf.data() + at, it->second->data() + in_chunk, n);
                 }
               });
}

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

// Looks up a live image. REQUIRES: pool.mu held.
StatusOr<std::shared_ptr<ImageState>> FindImage(PoolState& pool, const std::string& image) {
  auto it = pool.images.find(image);
  if (it == pool.images.end()) return ImageNotFound(pool, image);
  return it->second;
}

class MemoryAsyncIo final : public AsyncIo {
 public:
  // `snap_id` 0 is the head (read-write); otherwise the snapshot with that
  // id (read-only).
  MemoryAsyncIo(std::shared_ptr<PoolState> pool, std::shared_ptr<ImageState> image,
                std::string snap, uint64_t snap_id, uint64_t snap_size)
      : pool_(std::move(pool)),
        image_(std::move(image)),
        snap_(std::move(snap)),
        snap_id_(snap_id),
        snap_size_(snap_size) {}

  ~MemoryAsyncIo() override {
    if (snap_id_ == 0) {
      std::lock_guard lock(pool_->mu);
      --image_->head_handles;
    }
  }

  Status StartRead(uint64_t tag, uint64_t offset, std::span<char> buf) override {
    return Start(MemoryOp::kRead, tag, offset, buf.size(), [&](ChunkMap& chunks) {
      ReadChunks(chunks, pool_->options.chunk_size, offset, buf);
    });
  }

  Status StartWrite(uint64_t tag, uint64_t offset, std::span<const char> buf) override {
    RETURN_IF_ERROR(Start(MemoryOp::kWrite, tag, offset, buf.size(), [&](ChunkMap& chunks) {
      WriteChunks(chunks, pool_->options.chunk_size, offset, buf);
    }));
    ++stats_.writes;  // one operation each
    ++stats_.ops;
    return OkStatus();
  }

  Status StartZero(uint64_t tag, uint64_t offset, uint64_t length) override {
    return Start(MemoryOp::kZero, tag, offset, length, [&](ChunkMap& chunks) {
      ZeroChunks(chunks, pool_->options.chunk_size, offset, length);
    });
  }

  Completion WaitOne() override {
    assert(!done_.empty() && "WaitOne with nothing in flight");
    Completion c = std::move(done_.front());
    done_.pop_front();
    return c;
  }

  size_t InFlight() const override { return done_.size(); }

  WriteStats write_stats() const override { return stats_; }

  Status Drain() override {
    RETURN_IF_ERROR(WaitAll());
    return CheckFault(*pool_, MemoryOp::kDrain, image_->name, snap_);
  }

 private:
  template <typename Apply>
  Status Start(MemoryOp op, uint64_t tag, uint64_t offset, uint64_t length, Apply&& apply) {
    const std::string what = Describe(op, offset, length);
    if (op != MemoryOp::kRead && snap_id_ != 0) {
      return FailedPrecondition(what + ": a snapshot is read-only");
    }
    RETURN_IF_ERROR(CheckStart(what, offset, length));
    if (Status fault = CheckFault(*pool_, op, image_->name, snap_, offset, length); !fault.ok()) {
      done_.push_back({tag, fault.Annotate(what)});
      return OkStatus();
    }
    std::lock_guard lock(pool_->mu);
    if (op == MemoryOp::kRead && snap_id_ != 0 && Vanished()) {
      // As RADOS does: the objects trimmed with a removed snapshot (or
      // image) read as absent, that is as zeros, without an error
      // (Volume::ConfirmSnap is what finds out).
      ChunkMap none;
      apply(none);
      done_.push_back({tag, OkStatus()});
      return OkStatus();
    }
    // The image may have shrunk or gone since CheckStart (another thread):
    // that is a failed I/O, reported with its completion.
    StatusOr<ChunkMap*> chunks = ChunksLocked(what, offset, length);
    if (!chunks.ok()) {
      done_.push_back({tag, chunks.status()});
      return OkStatus();
    }
    apply(**chunks);
    done_.push_back({tag, OkStatus()});
    return OkStatus();
  }

  Status CheckStart(const std::string& what, uint64_t offset, uint64_t length) {
    std::lock_guard lock(pool_->mu);
    if (snap_id_ != 0 && Vanished()) {
      return offset > snap_size_ || length > snap_size_ - offset
                 ? InvalidArgument(
                       fmt::format("{}: beyond the end of the image ({} bytes)", what, snap_size_))
                 : OkStatus();
    }
    return ChunksLocked(what, offset, length).status();
  }

  // The snapshot this handle reads, or its image, was removed.
  // REQUIRES: pool_->mu held.
  bool Vanished() { return image_->removed || FindSnapById(*image_, snap_id_) == nullptr; }

  // The chunk map this handle reads or writes, after checking the range.
  // REQUIRES: pool_->mu held.
  StatusOr<ChunkMap*> ChunksLocked(const std::string& what, uint64_t offset, uint64_t length) {
    if (image_->removed) return NotFound(what + ": the image was removed");
    ChunkMap* chunks = &image_->head;
    uint64_t size = image_->size;
    if (snap_id_ != 0) {
      SnapState* s = FindSnapById(*image_, snap_id_);
      if (s == nullptr) return NotFound(what + ": the snapshot was removed");
      chunks = &s->chunks;
      size = s->size;
    }
    if (offset > size || length > size - offset) {
      return InvalidArgument(fmt::format("{}: beyond the end of the image ({} bytes)", what, size));
    }
    return chunks;
  }

  std::string Describe(MemoryOp op, uint64_t offset, uint64_t length) const {
    const char* verb = op == MemoryOp::kRead    ? "reading"
                       : op == MemoryOp::kWrite ? "writing"
                                                : "zeroing";
    return fmt::format("{} {}/{}{}{} at {}~{}", verb, pool_->name, image_->name,
                       snap_.empty() ? "" : "@", snap_, offset, length);
  }

  std::shared_ptr<PoolState> pool_;
  std::shared_ptr<ImageState> image_;
  const std::string snap_;
  const uint64_t snap_id_;
  const uint64_t snap_size_;  // at OpenIo, for reads after it is gone
  std::deque<Completion> done_;
  WriteStats stats_;
};

}  // namespace

// --- MemoryPool ------------------------------------------------------------

MemoryPool::MemoryPool(std::string name, MemoryPoolOptions options) {
  assert(std::has_single_bit(options.chunk_size) && options.chunk_size >= 512);
  if (!options.now_ns) options.now_ns = SystemNowNs;
  state_ = std::make_shared<PoolState>(std::move(name), std::move(options));
}

MemoryPool::~MemoryPool() = default;

const std::string& MemoryPool::name() const { return state_->name; }

void MemoryPool::SetFault(MemoryFaultFn fn) {
  std::lock_guard lock(state_->mu);
  state_->fault = std::move(fn);
}

StatusOr<std::unique_ptr<Volume>> MemoryPool::Open(const std::string& image) {
  RETURN_IF_ERROR(CheckFault(*state_, MemoryOp::kOpen, image));
  std::lock_guard lock(state_->mu);
  ASSIGN_OR_RETURN(std::shared_ptr<ImageState> state, FindImage(*state_, image));
  return std::unique_ptr<Volume>(std::make_unique<MemoryVolume>(state_, std::move(state), image));
}

Status MemoryPool::Create(const std::string& image, uint64_t size) {
  if (image.empty()) return InvalidArgument("creating an image: empty name");
  RETURN_IF_ERROR(CheckFault(*state_, MemoryOp::kCreate, image));
  std::lock_guard lock(state_->mu);
  if (state_->images.contains(image)) {
    return AlreadyExists(fmt::format("image {}/{} already exists", state_->name, image));
  }
  auto state = std::make_shared<ImageState>(image);
  state->size = size;
  state_->images.emplace(image, std::move(state));
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
  RETURN_IF_ERROR(CheckFault(*state_, MemoryOp::kRemove, image));
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
  RETURN_IF_ERROR(CheckFault(*state_, MemoryOp::kClone, image, snap));
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
  RETURN_IF_ERROR(CheckFault(*state_, MemoryOp::kCopy, image, snap));
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
  RETURN_IF_ERROR(CheckFault(*pool_, MemoryOp::kResize, name_));
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
  RETURN_IF_ERROR(CheckFault(*pool_, MemoryOp::kCreateSnap, name_, snap));
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
  RETURN_IF_ERROR(CheckFault(*pool_, MemoryOp::kRemoveSnap, name_, snap));
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

Status MemoryVolume::DiffExtents(const std::string& from_snap, const std::string& to_snap,
                                 const std::function<Status(const Extent&)>& fn) {
  RETURN_IF_ERROR(CheckFault(*pool_, MemoryOp::kDiff, name_, to_snap));
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
  RETURN_IF_ERROR(CheckFault(*pool_, MemoryOp::kOpenIo, name_, snap));
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
  return std::unique_ptr<AsyncIo>(
      std::make_unique<MemoryAsyncIo>(pool_, image_, snap, snap_id, snap_size));
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
